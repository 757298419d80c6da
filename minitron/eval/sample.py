"""A model's greedy continuation of a prompt: the quickest look at what a model has learnt, shown
beside its perplexity by minitron-eval and the pipeline."""
import torch


def healed_prefix(tokenizer, prompt: str):
    """(context ids, ids the first new token may take). The prompt's last token is taken back and
    the first new token must start with its text (token healing): a prompt ending in a space asks
    for what follows a lone " " token, which a BPE tokenizer rarely produces, since " name" is one
    token, so an unhealed `def ` is continued by noise."""
    ids = tokenizer(prompt)["input_ids"]
    context, last = ids[:-1], ids[-1]
    if not context:  # the decoders drop nothing at a document's start: begin from the separator
        context = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    # Decode each candidate after the context's last token: sentencepiece decoders drop a leading
    # space of a token decoded alone, so the text must be compared in context.
    anchor = context[-1:]
    wanted = tokenizer.decode(anchor + [last])
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))])
    allowed = [i for i, text in enumerate(texts) if i not in special and text.startswith(wanted)]
    return context, allowed or [last]


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The prompt and up to `max_new_tokens` greedy tokens after it, as text (special tokens left
    out; it stops at the tokenizer's EOS)."""
    context, allowed = healed_prefix(tokenizer, prompt)
    device = next(model.parameters()).device
    ids = torch.tensor([context], device=device)
    everything = list(range(len(tokenizer)))
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        prefix_allowed_tokens_fn=lambda _, seq: allowed if seq.shape[0] == len(context) else everything)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)


def format_sample(label: str, prompt: str, text: str, max_lines: int = 8) -> str:
    """`label`'s sample for the terminal and report.md: a heading, then the text's lines behind a
    gutter that keeps their indentation visible."""
    lines = text.rstrip().splitlines()[:max_lines] or [""]
    return "\n".join([f"{label}, greedy from {prompt!r}:", *(f"  | {line}" for line in lines)])
