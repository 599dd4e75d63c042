"""bench/profile_step: a real profiler trace of a small program is read back per HLO op, and each
op lands in the kind and pass of what it computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import profile_step


def _loss(w, x):
  y = jax.lax.conv_general_dilated(x, w["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = jax.nn.relu(y).mean(axis=(1, 2))
  return jnp.tanh(y @ w["dense"]).sum()


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
  r = np.random.default_rng(0)
  w = {"conv": jnp.asarray(r.normal(size=(3, 3, 8, 16)), jnp.float32),
       "dense": jnp.asarray(r.normal(size=(16, 32)), jnp.float32)}
  x = jnp.asarray(r.normal(size=(4, 16, 16, 8)), jnp.float32)
  grad = jax.jit(jax.grad(_loss))
  compiled = grad.lower(w, x).compile()
  jax.block_until_ready(compiled(w, x))
  trace_dir = str(tmp_path_factory.mktemp("trace"))
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(2):
      jax.block_until_ready(compiled(w, x))
  text = compiled.as_text()
  module = text.split(",", 1)[0].removeprefix("HloModule ")
  return profile_step.kernel_events(trace_dir), profile_step.parse_hlo(text), module


def test_every_kernel_is_an_instruction_of_the_module(traced):
  events, hlo, module = traced
  ours = [e for e in events if e["args"]["hlo_module"] == module]
  assert ours, "the trace names no kernel of the traced module"
  assert {e["args"]["hlo_op"] for e in ours} <= set(hlo)


def test_attribution_by_kind_and_pass(traced):
  events, hlo, module = traced
  result = profile_step.attribute(events, hlo, module, steps=2)
  assert result["unmatched_seconds"] == 0
  assert result["kernel_seconds_per_step"] > 0
  assert result["by_kind"]["convolution"]["seconds"] > 0  # forward and both gradients of the conv
  assert result["by_kind"]["dot"]["seconds"] > 0
  assert {"forward", "backward"} <= set(result["by_pass"])  # the dense layer's gradient is named
  shares = sum(v["share"] for v in result["by_kind"].values())
  assert shares == pytest.approx(1.0, abs=1e-3)
  assert [r["seconds"] for r in result["top"]] == sorted((r["seconds"] for r in result["top"]), reverse=True)
  convs = [r for r in result["top"] if r["kind"] == "convolution"]
  # The forward conv keeps its JAX name; XLA rewrites the gradients into convolutions of its own.
  assert "forward" in {r["pass"] for r in convs} and len(convs) >= 2


def test_kinds_follow_the_fused_opcodes():
  assert profile_step.kind_of({"fusion", "convolution", "add"}) == "convolution"
  assert profile_step.kind_of({"fusion", "dot", "reduce"}) == "dot"
  assert profile_step.kind_of({"select-and-scatter"}) == "pooling"
  assert profile_step.kind_of({"fusion", "reduce", "multiply"}) == "reduction"
  assert profile_step.kind_of({"fusion", "transpose", "parameter"}) == "copy/transpose"
  assert profile_step.kind_of({"fusion", "transpose", "multiply", "parameter"}) == "elementwise"
  assert profile_step.pass_of("jit(f)/transpose(jvp())/dot_general") == "backward"
  assert profile_step.pass_of("jit(f)/jvp()/dot_general") == "forward"
  assert profile_step.pass_of("jit(f)/add") == "other"
  assert profile_step.pass_of("") == "unnamed"


def test_a_folder_without_a_trace_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    profile_step.kernel_events(str(tmp_path))
