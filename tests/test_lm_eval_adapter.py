"""evaluate_lm on custom lm-eval tasks built from local files (no downloads)."""

import json
import math

import pytest
from tiny_lm import tiny_gpt2, train_tokenizer

from tnexp.eval import evaluate_lm, flatten_lm_eval_results
from tnexp.models.hf import load_tokenizer

SENTENCES = [
    "The return statement leaves the current function call with a value",
    "A class definition defines a class object and its attributes",
    "The pass statement is a null operation and nothing happens",
    "Assignment statements bind names to values in the current scope",
    "The global statement declares names for the whole code block",
    "An import statement finds a module and initialises it if necessary",
]

# Same shapes as lm-eval's lambada_openai (loglikelihood), piqa (multiple_choice) and
# wikitext (loglikelihood_rolling) configs, reading local JSONL files.
TASKS = {
    "tnexp_lastword": """
task: tnexp_lastword
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{data}/lastword.jsonl"}}
  cache_dir: "{cache}"
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "tnexp_choice": """
task: tnexp_choice
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{data}/choice.jsonl"}}
  cache_dir: "{cache}"
output_type: multiple_choice
test_split: test
doc_to_text: "Goal: {{{{goal}}}}\\nSolution:"
doc_to_choice: "{{{{[sol1, sol2]}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "tnexp_rolling": """
task: tnexp_rolling
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{data}/pages.jsonl"}}
  cache_dir: "{cache}"
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data, cache = root / "data", root / "hf_cache"
    data.mkdir()

    def write(name, rows):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("lastword.jsonl", [{"text": s} for s in SENTENCES])
    write(
        "choice.jsonl",
        [
            {"goal": s[:30], "sol1": s[30:], "sol2": SENTENCES[i - 1][30:], "label": 0}
            for i, s in enumerate(SENTENCES)
        ],
    )
    write("pages.jsonl", [{"page": " ".join(SENTENCES[i:] + SENTENCES[:i])} for i in range(3)])
    tasks = root / "tasks"
    tasks.mkdir()
    for name, text in TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.format(data=data, cache=cache))
    return tasks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(directory)
    # Reload through tnexp's loader: it adds the pad token lm-eval's batching needs.
    return tiny_gpt2(len(tokenizer), n_positions=64), load_tokenizer(str(directory))


@pytest.mark.slow  # end to end: in `uv run pytest -m slow` (.ci/run), not the default suite
def test_evaluate_lm_on_local_custom_tasks(tiny, task_dir):
    model, tokenizer = tiny
    model.train()  # the adapter must evaluate in eval mode and restore the mode
    metrics = evaluate_lm(
        model,
        tokenizer,
        tasks=["tnexp_lastword", "tnexp_choice", "tnexp_rolling"],
        include_path=task_dir,
        batch_size=2,
        device="cpu",
        bootstrap_iters=0,
        limit=4,
        return_raw=True,
    )
    raw = metrics.pop("raw")
    assert model.training
    expected = {
        "tnexp_lastword/acc",
        "tnexp_lastword/perplexity",
        "tnexp_choice/acc",
        "tnexp_choice/acc_norm",
        "tnexp_rolling/word_perplexity",  # lm-eval's name, never a bare "ppl"
        "tnexp_rolling/byte_perplexity",
        "tnexp_rolling/bits_per_byte",
    }
    assert expected <= set(metrics)
    assert not any(key.endswith("/ppl") for key in metrics)
    for key in expected:
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["tnexp_choice/acc"] <= 1.0
    # A random model with a 400-token vocabulary: perplexities are large but finite.
    assert metrics["tnexp_rolling/word_perplexity"] > 1.0
    assert raw["results"]["tnexp_lastword"]["acc,none"] == metrics["tnexp_lastword/acc"]


def test_flatten_keeps_metric_names_and_filters():
    flat = flatten_lm_eval_results(
        {
            "results": {
                "wikitext": {
                    "alias": "wikitext",
                    "word_perplexity,none": 20.38,
                    "word_perplexity_stderr,none": "N/A",
                    "bits_per_byte,none": 0.9,
                },
                "gsm8k": {"exact_match,strict-match": 0.5},
            }
        }
    )
    assert flat == {
        "wikitext/word_perplexity": 20.38,
        "wikitext/bits_per_byte": 0.9,
        "gsm8k/exact_match@strict-match": 0.5,
    }
