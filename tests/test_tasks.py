import math

import torch

from tnexp.tasks import CausalLMTask, ClassificationTask


def test_causal_lm_loss_matches_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_layer=1,
            n_head=4,
            n_positions=32,
            vocab_size=50,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    task = CausalLMTask()
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        ours = task.loss(task.forward(model, batch), batch)
        labels = ids.masked_fill(mask == 0, -100)
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, reference)
    metrics = task.make_metrics()
    task.update_metrics(metrics, None, batch, ours)
    values = task.finalize(metrics.compute())
    assert math.isclose(values["ppl"], math.exp(values["loss"]), rel_tol=1e-6)


def test_classification_metrics_in_percent():
    task = ClassificationTask(10)
    metrics = task.make_metrics()
    logits = torch.eye(10)[:4] * 5
    logits[3, 0] = 1.0  # wrong top-1, right within the top 5
    targets = torch.tensor([0, 1, 2, 0])
    loss = task.loss(logits, (None, targets))
    task.update_metrics(metrics, logits, (None, targets), loss)
    values = task.finalize(metrics.compute())
    assert values["top1"] == 75.0 and values["top5"] == 100.0
