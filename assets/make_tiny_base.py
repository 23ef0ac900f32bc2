"""Build ``assets/tiny-base``: a tiny Llama-style base model pretrained from scratch on CPU.

The corpus is synthetic customer-support language (customer messages, agent replies and
generic chat turns) sharing the vocabulary of ``make_support_tickets.py``. It never contains
the "Route this ticket:" instruction or message -> queue-name pairs, so the base model knows
the domain and the chat format but cannot route tickets until it is fine-tuned.

Deterministic and idempotent (fixed seeds, deterministic torch kernels, fixed step count).
Run from the repository root (about 3-4 minutes on 2 CPU cores)::

    python assets/make_tiny_base.py
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))  # share the domain vocabulary with the dataset script
import make_support_tickets as tickets  # noqa: E402

log = logging.getLogger("make_tiny_base")

SEED = 1234
OUT_DIR = Path(__file__).resolve().parent / "tiny-base"
N_DOCS = 24_000
VOCAB_SIZE = 1280
BLOCK_SIZE = 128
BATCH_SIZE = 16
STEPS = 800
PEAK_LR = 3e-3
WARMUP_STEPS = 60
THREADS = 2

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]

# Every turn is "<|role|>\n{content}<|eos|>\n"; the assistant content sits in a generation block
# so TRL's assistant_only_loss works too. The prompt rendered with add_generation_prompt=True is a
# token-level prefix of the full rendering, which TRL's prompt-completion masking relies on.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# Agent replies per issue type. They react to the keywords but never name a queue,
# so pretraining teaches "read the message" without teaching the routing labels.
AGENT_REPLIES: dict[str, list[str]] = {
    "billing": [
        "I checked your invoice and corrected the amount.",
        "The extra charge has been removed from your statement.",
        "Your new card is now saved as the payment method.",
        "The fee was added by mistake and I have reversed it.",
        "I sent a copy of the invoice to your email.",
        "The payment went through and the invoice is now marked as paid.",
    ],
    "shipping": [
        "Your package is on the way and should arrive by {day}.",
        "I asked the courier to try the delivery again.",
        "Here is a new tracking number for your parcel.",
        "I have updated the delivery address on your order.",
        "The warehouse will send the missing items tomorrow.",
        "I opened a claim with the courier about the lost parcel.",
    ],
    "account": [
        "I sent a new password reset link to your email address.",
        "Your login is unlocked now, please sign in again.",
        "I changed the username on your profile.",
        "A new two factor code is on its way to your phone.",
        "Your profile and data will be deleted within {n} days.",
        "I reset your security question so you can sign in.",
    ],
    "technical": [
        "Please update the app to the latest version and restart it.",
        "Our engineers are fixing the error on the settings page.",
        "Clearing the browser cache should fix the loading screen.",
        "Try to reinstall the app and sync your {product} again.",
        "The bug is known and a fix will ship in the next update.",
        "Please restart the {product} and reconnect it to the wifi.",
    ],
    "refund": [
        "Your refund of {n} dollars was sent to your bank.",
        "The money should be back in your bank in {n} days.",
        "I have approved a full refund for your {product}.",
        "Once the return arrives we will send your money back.",
        "A partial refund for the {product} is on its way.",
        "I have reimbursed the unused months to your card.",
    ],
}
AGENT_OPENINGS = ["Thanks for reaching out, {name}.", "Hi {name}, sorry for the trouble.", "Hello {name}.", ""]
AGENT_CLOSINGS = [
    "Is there anything else I can help with?",
    "Have a great day.",
    "Let us know if it happens again.",
    "",
]
USER_PREFIXES = ["", "", "Please help: ", "Reply to this message: ", "Customer wrote: "]

# Help-centre articles, listed under lowercase topic headers (a header starts a line, so the
# tokenizer learns the bare topic words as whole tokens). Plain text only, never a chat answer.
HELP_ARTICLES: dict[str, list[str]] = {
    "billing": [
        "How to read your invoice",
        "Changing your payment method",
        "Why was my card declined",
        "Understanding fees and tax",
    ],
    "shipping": [
        "Tracking your package",
        "Changing the delivery address",
        "What to do about a late delivery",
        "Courier contacts",
    ],
    "account": [
        "Resetting your password",
        "Setting up two factor codes",
        "Changing your username",
        "Deleting your profile",
    ],
    "technical": [
        "Fixing app crashes",
        "Clearing the browser cache",
        "Syncing your devices",
        "Installing the latest update",
    ],
    "refund": ["How refunds work", "Returning an item", "When will I get my money back", "Partial refunds"],
}

# Generic small talk so the model learns the chat format beyond support tickets.
GENERIC_CHAT: list[tuple[str, str]] = [
    ("How are you today?", "I am doing well, thanks for asking. How can I help you?"),
    ("Can you help me?", "Of course. Please tell me what happened."),
    ("Thank you!", "You are welcome, have a great day."),
    ("What are your opening hours?", "Our support team is open from nine to five on weekdays."),
    ("Can I talk to a person?", "Sure, an agent will join this chat in a few minutes."),
    ("Where are you based?", "Our main office is in a small town by the sea."),
    ("Do you sell a {product}?", "Yes, we sell a {product} in three colours."),
    ("Is the {product} in stock?", "The {product} is in stock and ready to ship."),
    ("Which teams do you have?", "We have billing, shipping, account, technical and refund teams."),
    ("Tell me something nice.", "Every problem has a solution, and we are here to find it with you."),
    ("What day is it?", "I think it is {day}, but please check your calendar."),
    ("Say hello to {name}.", "Hello {name}, nice to meet you."),
    ("How many days until {day}?", "It depends on today, but never more than six days."),
    ("Can you write a short greeting?", "Hello and welcome, we are glad you are here."),
]


def agent_reply(category: str, rng: random.Random) -> str:
    """An agent answer to an issue of the given type: opening, 1-2 fixes, closing."""
    fixes = rng.sample(AGENT_REPLIES[category], k=rng.choice((1, 2)))
    parts = [rng.choice(AGENT_OPENINGS), *fixes, rng.choice(AGENT_CLOSINGS)]
    return tickets.fill(" ".join(p for p in parts if p), rng)


def help_index(rng: random.Random) -> str:
    """A help-centre index: 2-3 topic headers in random order, each with a few article titles."""
    lines = ["help centre"]
    for topic in rng.sample(tickets.CATEGORIES, k=rng.choice((2, 3))):
        lines.append(topic)
        lines += [f"- {title}" for title in rng.sample(HELP_ARTICLES[topic], k=2)]
    return "\n".join(lines)


def build_corpus(n_docs: int, seed: int) -> tuple[list[str], list[list[dict[str, str]]]]:
    """Plain-text documents and chat conversations, excluding every eval-split message."""
    rng = random.Random(seed)
    held_out = tickets.eval_messages()
    texts: list[str] = []
    chats: list[list[dict[str, str]]] = []
    while len(texts) + len(chats) < n_docs:
        category = rng.choice(tickets.CATEGORIES)
        message = tickets.make_message(category, rng)
        if message in held_out:
            continue
        kind = rng.random()
        if kind < 0.40:  # support chat: customer message -> agent reply
            user = rng.choice(USER_PREFIXES) + message
            chats.append(
                [{"role": "user", "content": user}, {"role": "assistant", "content": agent_reply(category, rng)}]
            )
        elif kind < 0.55:  # generic small talk, sometimes two turns long
            turns: list[dict[str, str]] = []
            for _ in range(rng.choice((1, 1, 2))):
                question, answer = (tickets.fill(t, rng) for t in rng.choice(GENERIC_CHAT))
                turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            chats.append(turns)
        elif kind < 0.78:  # a bare customer message
            texts.append(message)
        elif kind < 0.82:  # a help-centre index page
            texts.append(help_index(rng))
        else:  # a plain-text transcript
            texts.append(f"Customer: {message}\nAgent: {agent_reply(category, rng)}")
    return texts, chats


def train_tokenizer(texts: list[str], chats: list[list[dict[str, str]]]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown tokens possible) wrapped as a HF fast tokenizer with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    turns = [m["content"] for chat in chats for m in chat]
    tok.train_from_iterator(texts + turns, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=512,
        padding_side="right",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def pack(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], chats: list[list[dict[str, str]]], seed: int
) -> torch.Tensor:
    """Shuffle documents, concatenate their ids and cut into BLOCK_SIZE rows."""
    docs = [f"{BOS}{t}{EOS}" for t in texts]
    docs += [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    random.Random(seed).shuffle(docs)
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += enc
    n_blocks = len(ids) // BLOCK_SIZE
    log.info("corpus: %d documents, %d tokens, %d blocks of %d", len(docs), len(ids), n_blocks, BLOCK_SIZE)
    return torch.tensor(ids[: n_blocks * BLOCK_SIZE]).view(n_blocks, BLOCK_SIZE)


def make_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """~0.9M parameters: small enough to pretrain on 2 cores in minutes, big enough to learn the domain."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, STEPS - WARMUP_STEPS)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model: LlamaForCausalLM, blocks: torch.Tensor, seed: int) -> None:
    """Plain AdamW loop over shuffled packed blocks for a fixed number of steps (no wall-clock budget,
    which would make the result depend on machine speed)."""
    gen = torch.Generator().manual_seed(seed)
    # No weight decay on norms (1-d), as usual.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR,
        betas=(0.9, 0.95),
    )
    model.train()
    order = torch.randperm(len(blocks), generator=gen)
    cursor, start, running = 0, time.monotonic(), 0.0
    for step in range(STEPS):
        if cursor + BATCH_SIZE > len(order):  # new epoch over the packed blocks
            order, cursor = torch.randperm(len(blocks), generator=gen), 0
        batch = blocks[order[cursor : cursor + BATCH_SIZE]]
        cursor += BATCH_SIZE
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % 100 == 0:
            log.info(
                "step %d/%d loss %.3f lr %.2e (%.0fs)",
                step + 1,
                STEPS,
                running / 100,
                lr_at(step),
                time.monotonic() - start,
            )
            running = 0.0
    model.eval()


def sample_reply(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, user: str) -> str:
    """Greedy chat reply, logged as a smoke test of the saved artefacts."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


MODEL_CARD = """# tiny-base

A tiny Llama-architecture causal LM ({n_params:,} parameters, fp32 safetensors) pretrained from scratch
by forgeline on a synthetic customer-support corpus. It exists so that tests and the quickstart can
post-train and serve a real *pretrained* model offline on a CPU in minutes. It is not useful for
anything else.

- Architecture: `LlamaForCausalLM`, hidden 128, 4 layers, 4 heads (2 KV heads), MLP 352,
  tied embeddings, context 512.
- Tokenizer: byte-level BPE, {vocab} tokens, trained on the same corpus. Special tokens
  `<|bos|>`, `<|eos|>`, `<|pad|>`, `<|system|>`, `<|user|>`, `<|assistant|>`.
- Chat template: `<|bos|>` then every turn as `<|role|>\\n{{content}}<|eos|>\\n`;
  `add_generation_prompt` appends `<|assistant|>\\n`. Assistant content is wrapped in
  `{{% generation %}}` so TRL's `assistant_only_loss` works.
- Pretraining data: {n_docs:,} synthetic documents built from the vocabulary of
  `assets/make_support_tickets.py`: customer messages, agent replies (as chats and transcripts),
  help-centre index pages and generic small talk; {steps} AdamW steps of {batch}x{block} tokens.
  It never contains the routing task (`Route this ticket: ...` -> queue name) and excludes every
  eval-split message, so the base model scores 0 on `recipes/data/support-tickets/eval.jsonl`
  (it answers like a support agent instead) until it is fine-tuned; a LoRA SFT
  (`recipes/quickstart.yaml`) takes it to ~1.0.
- Rebuild with `python assets/make_tiny_base.py` (about 3-4 minutes on 2 CPU cores). Seeds, step
  count and kernels are fixed, so a rebuild with the same torch version on the same kind of CPU
  gives identical files.
"""


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.monotonic()
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)  # cheap on CPU; makes the weights reproducible

    texts, chats = build_corpus(N_DOCS, SEED)
    tokenizer = train_tokenizer(texts, chats)
    log.info("tokenizer: %d tokens", len(tokenizer))
    blocks = pack(tokenizer, texts, chats, SEED)

    model = make_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters; pretraining %d steps", n_params, STEPS)
    pretrain(model, blocks, SEED)

    # Idempotent: build the folder aside, then swap it in, so stale files never survive and a
    # concurrent reader of the old folder sees it disappear only for an instant.
    staging = OUT_DIR.with_name(OUT_DIR.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64,
    )
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "README.md").write_text(
        MODEL_CARD.format(
            n_params=n_params, vocab=len(tokenizer), n_docs=N_DOCS, steps=STEPS, batch=BATCH_SIZE, block=BLOCK_SIZE
        ),
        encoding="utf-8",
    )
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    staging.rename(OUT_DIR)
    log.info("sample reply: %r", sample_reply(model, tokenizer, "Hi, my package has not arrived yet. Thanks, Anna"))
    log.info("saved to %s in %.0fs", OUT_DIR, time.monotonic() - t0)


if __name__ == "__main__":
    main()
