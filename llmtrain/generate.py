"""`python -m llmtrain.generate <model dir> [key=value ...]`: sample text from a causal LM, or fill [MASK]s.

The model directory is any Hugging Face model directory with its tokenizer: a run's `model/`, a
checkpoint (`checkpoints/best`), or a run directory (its `model/` is used). Defaults are in
conf/generate.yaml; arguments are `key=value` as in `python -m llmtrain.run`.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase, pipeline, set_seed)

from llmtrain.training import checkpoint
from llmtrain.config import CONF
from llmtrain.errors import ConfigError, UserError

DEFAULTS = CONF / "generate.yaml"
TEXT_KEYS = {"mode", "prompt", "prompt_file", "device"}  # taken verbatim; every other setting is a number
MODES = ("generate", "fill-mask")
USAGE = ("usage: python -m llmtrain.generate <model dir> [prompt=TEXT | prompt_file=FILE] [max_new_tokens=N] "
         "[temperature=T] [top_k=K] [top_p=P] [no_repeat_ngram_size=N] [num_return_sequences=N] [seed=S] "
         "[mode=generate|fill-mask] [num_predictions=N]; defaults and the full list: llmtrain/conf/generate.yaml")


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """Split argv into the model directory and the settings (conf/generate.yaml updated by key=value pairs).

    Raises one ConfigError listing every unknown key, unparsable value and out-of-range setting.
    """
    settings = OmegaConf.to_container(OmegaConf.load(DEFAULTS))
    problems, positional = [], []
    for arg in argv:
        key, eq, raw = arg.partition("=")
        if not eq or "/" in key or (key not in settings and Path(arg).exists()):  # a path may hold "="
            positional.append(arg)
            continue
        if key not in settings:
            hint = difflib.get_close_matches(key, list(settings), n=1)
            problems.append(f"{key} is not a setting" + (f"; did you mean {hint[0]}?" if hint else
                                                         f"; known: {', '.join(settings)}"))
            continue
        if key in TEXT_KEYS:
            settings[key] = raw
            continue
        expected = type(settings[key])
        try:
            settings[key] = expected(raw) if expected is float else int(raw)
        except ValueError:
            problems.append(f"{key}={raw}: expected {'an integer' if expected is int else 'a number'}")
    if len(positional) != 1:
        problems.insert(0, "give exactly one model directory as the first argument" +
                        (f" (got {len(positional)}: {' '.join(positional)})" if positional else ""))
    problems += check(settings)  # a value that did not parse kept its default, so it is reported once
    if problems:
        raise ConfigError(problems)
    return positional[0], settings


def check(s: dict) -> list[str]:
    """Every out-of-range setting, each with what to type instead."""
    rules = [("mode", s["mode"] in MODES, f"use {' or '.join(MODES)}"),
             ("max_new_tokens", s["max_new_tokens"] >= 1, "use 1 or more"),
             ("temperature", s["temperature"] >= 0, "use 0 (greedy) or a positive temperature, e.g. 0.7"),
             ("top_k", s["top_k"] >= 0, "use 0 (off) or a positive number"),
             ("top_p", 0 < s["top_p"] <= 1, "use a probability in (0, 1], 1.0 = off"),
             ("no_repeat_ngram_size", s["no_repeat_ngram_size"] >= 0, "use 0 (off) or a positive n-gram size"),
             ("repetition_penalty", s["repetition_penalty"] > 0, "use a positive number, 1.0 = off"),
             ("num_return_sequences", s["num_return_sequences"] >= 1, "use 1 or more"),
             ("num_predictions", s["num_predictions"] >= 1, "use 1 or more"),
             ("device", s["device"] in ("cpu", "cuda", "auto"), "use cpu, cuda or auto")]
    problems = [f"{key}={s[key]}: {fix}" for key, ok, fix in rules if not ok]
    if s["prompt"] is not None and s["prompt_file"] is not None:
        problems.append("give prompt=... or prompt_file=..., not both")
    if s["mode"] == "generate" and s["temperature"] == 0 and s["num_return_sequences"] > 1:
        problems.append(f"num_return_sequences={s['num_return_sequences']} with temperature=0 (greedy) prints the "
                        "same text each time: set temperature above 0 to sample")
    if s["device"] == "cuda" and not torch.cuda.is_available():
        problems.append("device=cuda but no CUDA GPU is visible: use device=cpu")
    return problems


def prompts_of(s: dict) -> list[str]:
    """The prompts: prompt=..., or one per non-blank line of prompt_file, or one empty prompt."""
    if s["prompt_file"] is None:
        return [s["prompt"] or ""]
    path = Path(s["prompt_file"]).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompt_file={s['prompt_file']}: no such file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"prompt_file={s['prompt_file']}: the file has no prompts (one per line)")
    return lines


def model_kind(config: PretrainedConfig) -> str:
    """clm, mlm, cls or base (no head), from the saved architecture name."""
    archs = config.architectures or []
    for arch in archs:
        if arch.endswith("ForMaskedLM"):
            return "mlm"
        if arch.endswith("ForSequenceClassification"):
            return "cls"
        if arch.endswith(("LMHeadModel", "ForCausalLM")):
            return "clm"
    return "base" if archs else "clm"


def resolve_model_dir(path: str) -> Path:
    """The directory holding config.json: the path itself, or a run directory's model/."""
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "config.json").exists() and (p / "model" / "config.json").exists():
        return p / "model"  # a run directory
    if not (p / "config.json").is_file():
        what = "no such directory" if not p.exists() else "no config.json in it"
        raise ConfigError(f"{path}: not a model directory ({what}); give a run's model/ directory, "
                          "e.g. outputs/<date>/<time>/model")
    return p


def load(path: str, mode: str, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (in eval mode) and its tokenizer, after checking the model can do what `mode` asks."""
    model_dir = resolve_model_dir(path)
    if (model_dir / checkpoint.CHECKSUMS).exists() and (problem := checkpoint.verify(model_dir)) is not None:
        raise ConfigError(f"{path}: the checkpoint is damaged: {problem}; use another checkpoint or model/")
    config = AutoConfig.from_pretrained(model_dir)
    kind, arch = model_kind(config), ", ".join(config.architectures or [config.model_type])
    if mode == "generate" and kind != "clm":
        fix = {"mlm": "a masked LM cannot generate text left to right; use mode=fill-mask with a prompt holding "
                      "[MASK], or train a causal LM (model=gpt2_small) to generate",
               "cls": "a sequence classifier does not generate text; train a causal LM (model=gpt2_small)",
               "base": "it has no language-model head; train a causal LM (model=gpt2_small)"}[kind]
        raise ConfigError(f"{model_dir} holds {arch}: {fix}")
    if mode == "fill-mask" and kind != "mlm":
        raise ConfigError(f"{model_dir} holds {arch}: mode=fill-mask needs a masked LM (model=distilbert...)"
                          + ("; use mode=generate" if kind == "clm" else ""))
    auto = AutoModelForCausalLM if mode == "generate" else AutoModelForMaskedLM
    model = auto.from_pretrained(model_dir).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        raise ConfigError(f"{model_dir}: no tokenizer saved with the model") from None
    return model, tokenizer


@torch.no_grad()
def sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, s: dict) -> torch.Tensor:
    """Token ids (num_return_sequences, prompt + up to max_new_tokens); seeded, so the same call gives the same ids."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"] if prompt else None
    if ids is None or ids.shape[1] == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ConfigError("the tokenizer has no start token to generate from: give prompt=...")
        ids = torch.tensor([[start]])
    limit = getattr(model.config, "max_position_embeddings", None)  # GPT-2's n_positions, by its attribute_map
    if limit and ids.shape[1] + s["max_new_tokens"] > limit:
        raise ConfigError(f"the prompt ({ids.shape[1]} tokens) plus max_new_tokens={s['max_new_tokens']} is more "
                          f"than the model's {limit} positions: lower max_new_tokens or shorten the prompt")
    set_seed(s["seed"])
    greedy = s["temperature"] == 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = {} if greedy else {"temperature": s["temperature"], "top_k": s["top_k"], "top_p": s["top_p"]}
    return model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                          do_sample=not greedy, max_new_tokens=s["max_new_tokens"],
                          num_return_sequences=s["num_return_sequences"], pad_token_id=pad,
                          no_repeat_ngram_size=s["no_repeat_ngram_size"],
                          repetition_penalty=s["repetition_penalty"], **options).cpu()


def generate_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, s: dict) -> list[str]:
    """The prompt and its continuation, once per returned sequence."""
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in sample(model, tokenizer, prompt, s)]


@dataclass
class Fill:
    token: str
    score: float


def fill_mask(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, k: int) -> list[list[Fill]]:
    """The k likeliest tokens for each [MASK] in the prompt (the tokenizer's own mask token also works)."""
    text = prompt.replace("[MASK]", tokenizer.mask_token)
    n = text.count(tokenizer.mask_token)
    if n == 0:
        raise ConfigError(f"prompt={prompt!r} has no [MASK]: mode=fill-mask predicts the tokens at [MASK] positions")
    out = pipeline("fill-mask", model=model, tokenizer=tokenizer, device=model.device)(text, top_k=k)
    per_mask = out if n > 1 else [out]
    return [[Fill(c["token_str"].strip(), float(c["score"])) for c in cands] for cands in per_mask]


def main(argv: list[str] | None = None) -> int:
    """Parse, check, load, print; returns the exit status (2 for a bad argument, as llmtrain.run)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + f"\ndefaults: {DEFAULTS}")
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        try:
            model_dir, s = parse_args(argv)
        except ConfigError as e:
            print(f"error: {e}\n{USAGE}", file=sys.stderr)
            return 2
        prompts = prompts_of(s)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if s["device"] == "auto" else s["device"]
        model, tokenizer = load(model_dir, s["mode"], device)
        for i, prompt in enumerate(prompts, 1):
            if s["mode"] == "fill-mask":
                print(prompt)
                for j, cands in enumerate(fill_mask(model, tokenizer, prompt, s["num_predictions"]), 1):
                    print(f"  [MASK] {j}: " + " | ".join(f"{c.token} {c.score:.3f}" for c in cands))
                continue
            texts = generate_texts(model, tokenizer, prompt, s)
            for j, text in enumerate(texts, 1):
                if len(prompts) > 1 or len(texts) > 1:
                    print(f"=== prompt {i}, sequence {j} ===")
                print(text)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
