"""The checks every adapter family passes on every tiny architecture, as PEFT's `testing_common` runs each
method's checks over its model zoo. A family's test class subclasses `FamilyChecks`, names the registered family
and supplies its oracle; pytest runs every check once per architecture in `tests/tiny.py`."""
import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import random_batch
from placement.families import get_family
from tiny import FAMILIES as ARCHITECTURES
from tiny import tiny_model


class FamilyChecks:
    family: str  # a name in placement.families.FAMILIES
    size = 4  # the family's size parameter at which the checks run (LoRA's rank)

    @pytest.fixture(params=sorted(ARCHITECTURES))
    def arch(self, request):
        return request.param

    @pytest.fixture
    def model(self, arch):
        return tiny_model(arch)

    # -- what a family's test class supplies ------------------------------------------------------------------
    def adapter_kwargs(self, targets: list[str]) -> dict:
        """A plan's adapter arguments for these targets, as `family.config` takes them."""
        raise NotImplementedError

    def score_and_oracle(self, model, site, batch) -> tuple[float, float]:
        """(our init-gradient score of `site`, the same quantity from the real implementation's `.grad`)."""
        raise NotImplementedError

    # PEFT's methods by default; a family of ours overrides these three with its own apply, save and loader
    def apply_adapter(self, model, targets: list[str]):
        return get_peft_model(model, get_family(self.family).config(self.adapter_kwargs(targets)))

    def save_adapter(self, adapted, folder, targets: list[str]) -> None:
        adapted.save_pretrained(folder)

    def load_adapter(self, base, folder):
        return PeftModel.from_pretrained(base, folder)

    # -- the checks ---------------------------------------------------------------------------------------------
    def rows(self, model) -> list[dict]:
        return [s.to_row() for s in get_family(self.family).find_sites(model)]

    def test_sites_are_modules_of_every_block(self, model):
        rows = self.rows(model)
        names = {name for name, _ in model.named_modules()}
        assert rows and all(row["site"] in names for row in rows)
        assert {row["layer"] for row in rows} == set(range(model.config.num_hidden_layers))

    def test_score_equals_the_real_gradient(self, model):
        batch = random_batch(1)
        seen = set()
        for site in get_family(self.family).find_sites(model):
            if site.role in seen:
                continue
            seen.add(site.role)
            ours, theirs = self.score_and_oracle(model, site, batch)
            assert theirs > 0 and ours == pytest.approx(theirs, rel=1e-5), site.name

    def test_stated_parameters_are_what_the_adapter_trains(self, model):
        family, rows = get_family(self.family), self.rows(model)
        chosen = rows[:: max(1, len(rows) // 3)][:3]
        adapted = self.apply_adapter(model, [r["site"] for r in chosen])
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        assert trainable == sum(family.params(row, self.size) for row in chosen)

    @pytest.mark.slow
    def test_adapter_round_trips(self, arch, model, tmp_path):
        rows = self.rows(model)
        torch.manual_seed(0)
        adapted = self.apply_adapter(model, [rows[-1]["site"]])
        with torch.no_grad():  # a trained-looking adapter, so that loading it changes the outputs
            for name, param in adapted.named_parameters():
                if param.requires_grad:
                    param.add_(0.1 * torch.randn_like(param))
        self.save_adapter(adapted, tmp_path, [rows[-1]["site"]])
        batch = random_batch(2)
        loaded = self.load_adapter(tiny_model(arch), tmp_path).eval()
        with torch.no_grad():
            expected = adapted.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            found = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            base = tiny_model(arch)(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        assert torch.allclose(found, expected, atol=1e-5) and not torch.allclose(found, base, atol=1e-4)
