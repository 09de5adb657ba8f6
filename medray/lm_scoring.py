"""Log-likelihoods from a causal language model: continuation scores for multiple choice, and sequence NLL.

`choice_logliks` follows lm-evaluation-harness's `loglikelihood`: the continuation's tokens are those of
`prompt + choice` after the prompt's own tokens, and its score is the sum of their log-probabilities given
everything before them. Inputs that are the same for several choices (single-token choices such as " A" .. " D"
share the prompt) run through the model once.

    scores = choice_logliks(model, tokenizer, ["Question: ...\\nAnswer:"], [" A", " B", " C", " D"])
    nll, tokens = sequence_nll(model, [{"input_ids": [1, 415, 2], "labels": [-100, 415, 2]}])[0]
"""

from __future__ import annotations

import torch

from medray.samples import IGNORE

MICRO_BATCH = 8


def choice_logliks(
    model, tokenizer, prompts: list[str], choices: list[str], micro_batch: int = MICRO_BATCH
) -> list[list[float]]:
    """The summed log-probability of each choice after each prompt.

    Args:
        model: A Hugging Face causal LM (a PEFT model is fine), in eval mode.
        tokenizer: Its tokenizer (special tokens, e.g. BOS, are added to the prompt as in training).
        prompts: The contexts.
        choices: The continuations scored after every prompt.
        micro_batch: Sequences per forward pass.

    Returns:
        `scores[i][j]`: log p(choice j | prompt i).
    """
    requests = []  # (prompt index, choice index, input ids, continuation ids)
    for i, prompt in enumerate(prompts):
        context = tokenizer(prompt)["input_ids"]
        for j, choice in enumerate(choices):
            whole = tokenizer(prompt + choice)["input_ids"]
            if whole[: len(context)] == context and len(whole) > len(context):
                continuation = whole[len(context) :]
            else:  # the tokenizer merged across the boundary: score the choice's own tokens after the prompt
                continuation = tokenizer(choice, add_special_tokens=False)["input_ids"]
            requests.append((i, j, tuple(context + continuation[:-1]), continuation))
    needed: dict[tuple[int, ...], int] = {}  # input -> how many final positions predict a continuation token
    for _, _, inputs, continuation in requests:
        needed[inputs] = max(needed.get(inputs, 0), len(continuation))
    log_probs = _final_log_probs(model, needed, micro_batch)
    scores = [[0.0] * len(choices) for _ in prompts]
    for i, j, inputs, continuation in requests:
        rows = log_probs[inputs][-len(continuation) :]
        scores[i][j] = float(sum(row[token] for row, token in zip(rows, continuation, strict=True)))
    return scores


def _final_log_probs(
    model, needed: dict[tuple[int, ...], int], micro_batch: int
) -> dict[tuple[int, ...], torch.Tensor]:
    """For each input, the log-softmax over the vocabulary at its last `needed[input]` positions (on the CPU).

    Rows are left-padded, so every row's last positions line up and the model computes logits only for the last
    few (`logits_to_keep`): the vocabulary projection over every position would cost more than the letters need.
    """
    device = next(model.parameters()).device
    inputs = sorted(needed, key=len, reverse=True)  # similar lengths share a batch: less padding
    results = {}
    for start in range(0, len(inputs), micro_batch):
        chunk = inputs[start : start + micro_batch]
        keep = max(needed[sequence] for sequence in chunk)
        longest = max(len(sequence) for sequence in chunk)
        ids = torch.zeros((len(chunk), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(chunk):
            ids[row, longest - len(sequence) :] = torch.tensor(sequence)
            mask[row, longest - len(sequence) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each row counts its positions from its first token
        with torch.inference_mode():
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=keep,
            ).logits
        for row, sequence in enumerate(chunk):
            results[sequence] = torch.log_softmax(logits[row, keep - needed[sequence] :].float(), dim=-1).cpu()
    return results


def _right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of rows padded on the right with id 0 (masked, so never attended to)."""
    longest = max(len(row) for row in rows)
    ids = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = 1
    return ids, mask


def sequence_nll(model, rows: list[dict[str, list[int]]], micro_batch: int = MICRO_BATCH) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, tokens in the loss) of each row, counted as the training loss counts them.

    Args:
        model: A Hugging Face causal LM.
        rows: `input_ids` and `labels` (-100 where the loss is off, as `medray.samples` makes them).
        micro_batch: Rows per forward pass.

    Returns:
        One (nll, tokens) pair per row: label k is predicted from the ids before it.
    """
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(rows), micro_batch):
        chunk = rows[start : start + micro_batch]
        ids, mask = _right_padded([row["input_ids"] for row in chunk])
        labels = torch.full_like(ids, IGNORE)
        for index, row in enumerate(chunk):
            labels[index, : len(row["labels"])] = torch.tensor(row["labels"])
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = labels[:, 1:].to(logits.device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
        )
        for index in range(len(chunk)):
            results.append((float(losses[index].sum()), int((targets[index] != IGNORE).sum())))
    return results
