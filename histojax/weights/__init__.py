"""Importing published weights: read a checkpoint, map it, store it for `init_from`.

    python -m histojax.convert --format clip --input ViT-B-16.pt --output /tmp/clip_b16
    python -m histojax.convert --format timm --preset uni2_h --input UNI2-h/ --output /tmp/uni2_h

One module per published format; `FORMATS` names them for the CLI.
"""

from histojax.weights import clip, timm_hub, timm_vit, torchvision_resnet, transformers_vit
from histojax.weights.readers import read_state_dict
from histojax.weights.torch_pickle import CheckpointReadError
from histojax.weights.store import init_train_state
from histojax.weights.transfer import Format, Imported, WeightMismatchError, import_tensors, model_variables

FORMATS: dict[str, Format] = {f.name: f for f in (clip.FORMAT, timm_vit.FORMAT, torchvision_resnet.FORMAT,
                                                 timm_hub.FORMAT, transformers_vit.FORMAT)}

__all__ = ["FORMATS", "CheckpointReadError", "Format", "Imported", "WeightMismatchError", "import_tensors", "init_train_state",
           "model_variables", "read_state_dict"]
