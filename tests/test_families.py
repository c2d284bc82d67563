"""Every registered adapter family through the shared harness, on every tiny architecture."""
from family_harness import FamilyChecks
from helpers import peft_lora_b_energy
from placement.families import FAMILIES
from placement.probe import ProbeSettings, probe


def test_every_registered_family_has_a_test_class():
    tested = {cls.family for cls in FamilyChecks.__subclasses__()}
    assert tested == set(FAMILIES)


class TestLoRA(FamilyChecks):
    family = "lora"

    def adapter_kwargs(self, targets):
        return dict(task_type="CAUSAL_LM", r=self.size, lora_alpha=2 * self.size, target_modules=targets)

    def score_and_oracle(self, model, site, batch):
        settings = ProbeSettings(r=self.size, alpha=2 * self.size, seed=7)
        ours = probe(model, [site], [batch], settings).scores.set_index("site").loc[site.name, "page_sampled"]
        return float(ours), peft_lora_b_energy(model, site.name, batch, self.size, 2 * self.size, 7)
