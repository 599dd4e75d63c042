"""The index: a searchable gallery, and the one owner of its folder.

    searcher.py   in memory: build (ScaNN tiers, exact, ADC over PQ codes), search, append,
                  delete, retrain; every choice that depends on the mode
    store.py      the folder's layout and its one reader (manifest, rows.npz and the row
                  origins, the mode's arrays, added patches)
    writer.py     its one writer: per mode, for a new index (`save`) and a grown one
    growth.py     when a grown searcher retrains (the probe), and the crash-safe swap of a
                  new generation (hard links, atomic exchange)
    curator.py    the one way to change a saved gallery (add, remove), for the CLI
                  (`python -m histojax.index add|remove`, histojax/index.py) and the service

This package's namespace holds the read side (`searcher`, `store`); readers (`query`,
`search`, the service's search and picture routes) import nothing else of it, so nothing
they import writes. Writers import `writer` (evaluate's new index) or `curator`.
"""

from histojax.indexing.searcher import (MODES, REORDER_DTYPES, Index, IndexConfig, adc_search, build,
                                        default_reorder, exact_search, l2_normalize, resolve_mode, search, top_k)
from histojax.indexing.store import (FORMAT_VERSION, ORIGIN_FIELDS, SLIDE_FIELDS, ManifestMismatch,
                                     added_patch_png, check_manifest, load, load_if_matching, load_rows, mismatches,
                                     read_manifest, slide_mask, with_origin, with_slide_fields)

__all__ = ["FORMAT_VERSION", "MODES", "ORIGIN_FIELDS", "REORDER_DTYPES", "SLIDE_FIELDS", "Index", "IndexConfig",
           "ManifestMismatch", "adc_search", "added_patch_png", "build", "check_manifest", "default_reorder",
           "exact_search", "l2_normalize", "load", "load_if_matching", "load_rows", "mismatches", "read_manifest",
           "resolve_mode", "search", "slide_mask", "top_k", "with_origin", "with_slide_fields"]
