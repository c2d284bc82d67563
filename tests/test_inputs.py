"""What exact mode keeps of a site input: the cheaper of x and its token Grams, counted in bytes."""
from types import SimpleNamespace

import pytest
import torch

from placement.probe import scores
from placement.probe.inputs import Input


@pytest.mark.parametrize("dtype, keeps_grams", [(torch.float32, True), (torch.bfloat16, False)])
def test_kept_form_is_the_smaller_in_bytes(dtype, keeps_grams):
    """64 tokens x 96: the Grams hold 4096 float32 (16 KiB), x 6144 elements, 24 KiB in float32, 12 in bfloat16;
    read by a 256-wide site, the Gram route (64^2 (96 + 256) multiply-adds) is cheaper than G (64 x 96 x 256)."""
    layout = scores.batch_layout(torch.ones(1, 64, dtype=torch.long))
    x = torch.randn(1, 64, 96).to(dtype)
    record = Input(x, 0, None)
    record.sites = [SimpleNamespace(d_out=256)]
    record.settle(layout)
    assert (record.grams is not None) == keeps_grams
    assert (record.source is None) == keeps_grams
