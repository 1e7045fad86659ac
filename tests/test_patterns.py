"""Rule patterns: '*' within one dotted component, '**' across; per-rule match report."""

import fnmatch
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny_lm import small_gpt2, small_llama
from torch import nn

from tnexp.factory import match_pattern, supported_kind, tensorize
from tnexp.models import cifar_resnet18
from tnexp.models.hf import tiny_hf_model
from tnexp.tn import TensorizationError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def bert_like(layers: int = 2, hidden: int = 8) -> nn.Module:
    """A module tree with BERT's names: attention.output.dense next to output.dense."""

    def layer() -> nn.Module:
        attention = nn.ModuleDict(
            {
                "self": nn.ModuleDict({"query": nn.Linear(hidden, hidden)}),
                "output": nn.ModuleDict({"dense": nn.Linear(hidden, hidden)}),
            }
        )
        return nn.ModuleDict(
            {
                "attention": attention,
                "intermediate": nn.ModuleDict({"dense": nn.Linear(hidden, 4 * hidden)}),
                "output": nn.ModuleDict({"dense": nn.Linear(4 * hidden, hidden)}),
            }
        )

    encoder = nn.ModuleDict({"layer": nn.ModuleList([layer() for _ in range(layers)])})
    return nn.ModuleDict({"encoder": encoder, "pooler": nn.ModuleDict({"dense": nn.Linear(8, 8)})})


def selected(model: nn.Module, pattern: str) -> list[str]:
    return [n for n, m in model.named_modules() if n and match_pattern(n, pattern)]


def test_star_stays_within_one_component():
    model = bert_like()
    assert selected(model, "encoder.layer.*.output.dense") == [
        "encoder.layer.0.output.dense",
        "encoder.layer.1.output.dense",
    ]  # fnmatch would also take both attention.output.dense
    assert (
        len(
            [
                n
                for n, _ in model.named_modules()
                if fnmatch.fnmatchcase(n, "encoder.layer.*.output.dense")
            ]
        )
        == 4
    )
    assert selected(model, "encoder.layer.?.intermediate.dense") == [
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.1.intermediate.dense",
    ]
    assert selected(model, "encoder.layer.[!0].output.dense") == ["encoder.layer.1.output.dense"]
    assert selected(model, "encoder.layer.1.out*.dense") == ["encoder.layer.1.output.dense"]
    assert selected(model, "pooler.dense") == ["pooler.dense"]  # exact path


def test_double_star_crosses_components():
    model = bert_like()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    dense = [n for n in linears if n.endswith(".dense")]
    assert selected(model, "**.dense") == dense
    assert selected(model, "encoder.**.dense") == [n for n in dense if n.startswith("encoder.")]
    assert selected(model, "encoder.layer.*.**.output.dense") == [
        n for n in dense if n.startswith("encoder.") and "output" in n
    ]  # '**' also matches zero components
    assert set(linears) <= set(selected(model, "**"))
    assert "encoder.layer.0.attention.self.query" in selected(model, "encoder.**")


def test_report_counts_each_rule_and_flags_mixed_kinds():
    model = bert_like()
    spec = {
        "rules": [
            {"pattern": "encoder.layer.*.intermediate.dense", "cr": 0.5},
            {"pattern": "encoder.**.dense", "cr": 0.5},  # catches two shapes
        ]
    }
    _, report = tensorize(model, spec)
    first, second = report.rule_matches()
    assert (first.count, first.mixed) == (2, False)
    assert first.groups == {"Linear 32x8": 2}
    assert second.count == 4 and second.mixed
    assert second.groups == {"Linear 8x8": 2, "Linear 8x32": 2}
    assert "several kinds/shapes" in str(report)
    assert [r["count"] for r in report.to_dict()["rules"]] == [2, 4]


def test_a_pattern_that_would_have_crossed_dots_says_so():
    with pytest.raises(TensorizationError, match=r"matches no.*use '\*\*' to cross"):
        tensorize(bert_like(), {"rules": [{"pattern": "encoder*dense", "cr": 0.5}]})


def _config_patterns() -> list[tuple[str, str]]:
    found = []
    paths = [*sorted((CONFIGS / "tensorize").glob("*.yaml")), CONFIGS / "method/profile.yaml"]
    for path in paths:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        rules = list(cfg.get("rules") or []) + list((cfg.get("smoke") or {}).get("rules") or [])
        found += [(path.name, r["pattern"]) for r in rules]
        if "pattern" in cfg:
            found.append((path.name, cfg["pattern"]))
    return found


@pytest.mark.parametrize(("config", "pattern"), _config_patterns())
def test_every_config_selects_the_same_layers_as_before(config, pattern):
    """The shipped configs select exactly what they selected under fnmatch semantics."""
    if pattern.startswith("transformer."):
        model = small_gpt2()
    elif pattern.startswith("encoder.layer"):
        model = tiny_hf_model("bert", hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    elif "layers.*.mlp.fc" in pattern:
        model = tiny_hf_model(
            "vit", hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=8
        )
    elif pattern.startswith("model.layers"):
        model = small_llama()
    else:
        model = cifar_resnet18(num_classes=10, width=4)
    names = [n for n, m in model.named_modules() if n and supported_kind(m)]
    new = [n for n in names if match_pattern(n, pattern)]
    if pattern in WRITTEN_FOR_PATH_GLOBS:  # configs added with the new semantics
        assert new == WRITTEN_FOR_PATH_GLOBS[pattern], config
        return
    old = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    assert new and new == old, config


# Configs written after '*' stopped crossing dots, and exactly what they must select
# (fnmatch would add the attention's output.dense to the second one).
WRITTEN_FOR_PATH_GLOBS = {
    "encoder.layer.*.intermediate.dense": [f"encoder.layer.{i}.intermediate.dense" for i in (0, 1)],
    "encoder.layer.*.output.dense": [f"encoder.layer.{i}.output.dense" for i in (0, 1)],
    "**.layers.*.mlp.fc*": [f"layers.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)],
}
