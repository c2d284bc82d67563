"""Half precision: the probe runs in bfloat16 and float16 with float32/float64 accumulators and agrees with float32,
and a gradient that overflows at some sites is counted there instead of poisoning the ranking."""
import numpy as np
import pytest
import torch

from conftest import random_batch
from placement.model.sites import find_sites
from placement.probe import ProbeSettings, probe
from tiny import tiny_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_agree_with_float32(batches, dtype):
    full = tiny_model("llama")
    half = tiny_model("llama").to(dtype)
    a = probe(full, find_sites(full), batches, ProbeSettings()).scores
    b = probe(half, find_sites(half), batches, ProbeSettings()).scores
    np.testing.assert_allclose(b["page"], a["page"], rtol=0.05)
    assert (b["nonfinite_batches"] == 0).all()


def test_an_overflow_at_one_site_is_counted_there_and_the_rest_still_rank(batches):
    model = tiny_model("llama", num_hidden_layers=3).to(torch.bfloat16)
    sites = find_sites(model)
    clean = probe(model, sites, batches, ProbeSettings()).scores.set_index("site")
    poisoned = "model.layers.1.mlp.down_proj"
    calls = []

    def overflow(module, inputs, output):  # the first batch's gradient at this site overflows
        if output.requires_grad and not calls:
            calls.append(1)
            output.register_hook(lambda grad: grad * float("inf"))

    handle = model.get_submodule(poisoned).register_forward_hook(overflow)
    try:
        scores = probe(model, sites, batches, ProbeSettings()).scores.set_index("site")
    finally:
        handle.remove()
    flagged = set(scores.index[scores["nonfinite_batches"] > 0])
    assert poisoned in flagged and scores.loc[poisoned, "nonfinite_batches"] == 1
    above = [s.name for s in sites if s.layer == 2]  # the overflow flows down the graph, never up
    assert not flagged & set(above)
    np.testing.assert_allclose(scores.loc[above, "page"], clean.loc[above, "page"], rtol=1e-6)
    assert np.isfinite(scores["page"]).all() and (scores["page"] >= 0).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_device_map_without_a_gpu_is_one_line(invoke, assert_one_line_error, model_dir, tmp_path):
    result = invoke("profile", "--model", model_dir, "--data", "builtin:arithmetic", "--device-map", "auto",
                    "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(result, "--device-map", "no", "GPU")
    assert not (tmp_path / "o").exists()


def test_unknown_device_map_is_one_line(invoke, assert_one_line_error, model_dir, tmp_path):
    result = invoke("profile", "--model", model_dir, "--data", "builtin:arithmetic", "--device-map", "everywhere",
                    "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(result, "--device-map", "auto")
