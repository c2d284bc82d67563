"""The checks every adapter family passes on every tiny architecture it supports, as PEFT's `testing_common` runs
each method's checks over its model zoo. A family's test class subclasses `FamilyChecks`, names the registered family
and supplies its oracle; pytest runs every check once per architecture in `architectures`. What a check needs
(applying a plan, saving and loading the adapter, the plan's config) comes from the family's registration: PEFT's
`get_peft_model` and files for PEFT's methods, the family's `Own` functions for ours."""
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import random_batch
from placement.families import get_family
from tiny import FAMILIES as ARCHITECTURES
from tiny import tiny_model


class FamilyChecks:
    family: str  # a name in placement.families.FAMILIES
    size = 4  # the family's size at which the checks run (LoRA's rank, a reduction factor, virtual tokens)
    architectures = tuple(sorted(ARCHITECTURES))  # the tiny models it supports
    per_block = True  # its sites are in every block (prompt tuning's one site is the input embedding)

    def pytest_generate_tests(self, metafunc):  # each check once per architecture the family adapts
        if "arch" in metafunc.fixturenames:
            metafunc.parametrize("arch", self.architectures)

    @pytest.fixture
    def model(self, arch):
        return tiny_model(arch)

    # -- what a family's test class supplies ------------------------------------------------------------------
    def score_and_oracle(self, model, site, batch) -> tuple[float, float]:
        """(our init-gradient score of `site`, the same quantity from the real implementation's `.grad`)."""
        raise NotImplementedError

    def chosen(self, rows: list[dict]) -> list[dict]:
        """The sites a plan of the family may take together (a few, spread over the model)."""
        return rows[:: max(1, len(rows) // 3)][:3]

    def one(self, rows: list[dict]) -> list[dict]:
        """The smallest plan: the last site."""
        return rows[-1:]

    # -- from the registration -----------------------------------------------------------------------------------
    def adapter_kwargs(self, model, targets: list[str]) -> dict:
        """A plan's config arguments for these targets, as the family makes them from a plan."""
        family = get_family(self.family)
        size = family.size
        plan = SimpleNamespace(family=self.family, targets=targets, sites=self.rows(model), peft={},
                               family_args={size.arg: self.size} if size and size.arg else {},
                               model={"model_type": model.config.model_type})
        return family.kwargs(plan, model)

    def apply_adapter(self, model, targets: list[str]):
        family = get_family(self.family)
        config = family.config(self.adapter_kwargs(model, targets))
        if family.own is not None:
            return family.own.attach(model, config, 5)
        torch.manual_seed(5)
        return get_peft_model(model, config)

    def save_adapter(self, adapted, folder) -> None:
        own = get_family(self.family).own
        own.save(adapted, folder) if own is not None else adapted.save_pretrained(folder)

    def load_adapter(self, base, folder):
        own = get_family(self.family).own
        return own.load(base, folder) if own is not None else PeftModel.from_pretrained(base, folder)

    # -- the checks ---------------------------------------------------------------------------------------------
    def rows(self, model) -> list[dict]:
        return [s.to_row() for s in get_family(self.family).find_sites(model)]

    def test_sites_are_modules_of_every_block(self, model):
        rows = self.rows(model)
        names = {name for name, _ in model.named_modules()}
        assert rows and all(row["site"] in names for row in rows)
        layers = {row["layer"] for row in rows}
        assert layers == (set(range(model.config.num_hidden_layers)) if self.per_block else {-1})

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
        family, chosen = get_family(self.family), self.chosen(self.rows(model))
        adapted = self.apply_adapter(model, [r["site"] for r in chosen])
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        assert trainable == sum(family.params(row, self.size) for row in chosen)

    @pytest.mark.slow
    def test_adapter_round_trips(self, arch, model, tmp_path):
        torch.manual_seed(0)
        adapted = self.apply_adapter(model, [r["site"] for r in self.one(self.rows(model))])
        with torch.no_grad():  # a trained-looking adapter, so that loading it changes the outputs
            for name, param in adapted.named_parameters():
                if param.requires_grad:
                    param.add_(0.1 * torch.randn_like(param))
        self.save_adapter(adapted, tmp_path)
        batch = random_batch(2)
        loaded = self.load_adapter(tiny_model(arch), tmp_path).eval()
        length = batch.input_ids.shape[1]  # prompt tuning's logits also cover its virtual tokens: compare the input's
        with torch.no_grad():
            expected = adapted.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            found = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            base = tiny_model(arch)(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        expected, found = expected[:, -length:], found[:, -length:]
        moved = float((expected - base).abs().max())  # small for some (a query scale barely moves a tiny model)
        assert moved > 1e-6 and float((found - expected).abs().max()) <= 1e-3 * moved
