"""Every registered adapter family through the shared harness, on every tiny architecture."""
from family_harness import FamilyChecks
from placement.families import get_family
from helpers import peft_lora_b_energy
from placement.families import FAMILIES
from placement.probe import ProbeSettings, probe


def _all(cls):
    return [c for sub in cls.__subclasses__() for c in [sub, *_all(sub)] if getattr(c, "family", None)]


def test_every_registered_family_has_a_test_class():
    tested = {cls.family for cls in _all(FamilyChecks)}
    assert tested == set(FAMILIES)


class TestLoRA(FamilyChecks):
    family = "lora"

    def adapter_kwargs(self, targets):
        return dict(task_type="CAUSAL_LM", r=self.size, lora_alpha=2 * self.size, target_modules=targets)

    def score_and_oracle(self, model, site, batch):
        settings = ProbeSettings(r=self.size, alpha=2 * self.size, seed=7)
        ours = probe(model, [site], [batch], settings).scores.set_index("site").loc[site.name, "page_sampled"]
        return float(ours), peft_lora_b_energy(model, site.name, batch, self.size, 2 * self.size, 7)


def _site_row(model, name):
    from placement.model.sites import find_sites
    site = next(s for s in find_sites(model) if s.name == name)
    return site.to_dict() | {"site": site.name}


class TestIA3(FamilyChecks):
    family = "ia3"

    def adapter_kwargs(self, targets):
        from placement.families.ia3 import ia3_kwargs
        return ia3_kwargs([_site_row(self._model, t) for t in targets])

    def apply_adapter(self, model, targets):
        self._model = model
        return super().apply_adapter(model, targets)

    def score_and_oracle(self, model, site, batch):
        import copy

        from peft import get_peft_model

        from placement.families.ia3 import ia3_config, ia3_kwargs
        from placement.model.loss import token_loss
        from placement.probe.families import family_scores

        ours = family_scores(model, [batch], ["ia3"]).set_index("site").loc[site.name, "page"]
        row = site.to_dict() | {"site": site.name}
        peft_model = get_peft_model(copy.deepcopy(model), ia3_config(ia3_kwargs([row])))
        token_loss(peft_model.base_model.model, batch).backward()
        grad = peft_model.base_model.model.get_submodule(site.name).ia3_l["default"].grad
        return float(ours), float(grad.double().pow(2).sum())


class _Bottleneck(FamilyChecks):
    placement = "series"
    size = 4  # the reduction factor a plan gives (width = read width // 4); the scores below take a width

    def adapter_kwargs(self, targets):
        return {"targets": targets, "reduction_factor": self.size}

    def apply_adapter(self, model, targets):
        from placement.families import bottleneck as bn
        return bn.apply(model, get_family(self.family).config(self.adapter_kwargs(targets)), seed=5)

    def save_adapter(self, adapted, folder, targets):
        from placement.families import bottleneck as bn
        bn.save(adapted, get_family(self.family).config(self.adapter_kwargs(targets)), folder)

    def load_adapter(self, base, folder):
        from placement.families import load
        return load(base, folder)

    def score_and_oracle(self, model, site, batch):
        import copy

        from placement.families import bottleneck as bn
        from placement.model.loss import token_loss
        from placement.probe.families import family_scores

        ours = family_scores(model, [batch], [self.family], width=self.size, activation="tanh", seed=5)
        config = bn.BottleneckConfig([site.name], self.placement, width=self.size, activation="tanh")
        adapted = bn.apply(copy.deepcopy(model), config, seed=5)
        token_loss(adapted, batch).backward()
        grad = adapted.get_submodule(site.name).adapter.up.weight.grad
        return float(ours.set_index("site").loc[site.name, "page"]), float(grad.double().pow(2).sum())


class TestSeriesBottleneck(_Bottleneck):
    family, placement = "series-bn", "series"


class TestParallelBottleneck(_Bottleneck):
    family, placement = "parallel-bn", "parallel"
