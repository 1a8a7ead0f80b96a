"""Command-line entry point: ``mmspec run`` (the main job on the zoo models), ``mmspec text``,
``mmspec vlm``, ``mmspec imagegen`` (also installed as ``mmspec-imagegen``).

Glossary: ``mmspec text`` without ``--target`` answers a chat prompt with the real SmolLM2-135M-Instruct
(installed from its wheel, :mod:`mmspec.pretrained`) and the EAGLE-3 head this repository trained for it;
``--example`` builds the small self-contained toy pair instead: a random Llama target whose later layers
are damped (their output projections scaled by 0.2) and a drafter made of its first layer (acceptance
around 0.4); with ``--target``/``--drafter`` it loads HF checkpoints (``from_pretrained``, local paths
or hub names when online). ``mmspec train-drafter`` trains a head or a small drafter LM for any causal LM
(:mod:`mmspec.distill`).

Failures: every argument is checked before any model is loaded or any output written; a failure
prints one line ``error: ...`` on stderr and ends with one of the exit codes below (``EXIT_*``,
listed in every ``--help``). ``main`` returns the code; ``mmspec vlm`` with an unreadable image
raises ``SystemExit`` with the code (its ``str`` is the message).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..image_gen.methods import METHOD_NAMES, get_method
from ..image_gen.heatmap import heatmap_image

#: exit codes of ``mmspec`` and ``mmspec-imagegen``, one per kind of outcome
EXIT_OK = 0
EXIT_NOT_IDENTICAL = 1  # ran, but the speculative output differs from the reference (greedy checks)
EXIT_BAD_INPUT = 2  # bad arguments or input: usage, non-finite / out-of-range numbers, empty prompt,
#                     unreadable image, a model path that cannot be loaded, a library input error
EXIT_OUTPUT = 3  # --out cannot be written (an existing file, a path under a file, no permission)
EXIT_ZOO = 4  # the embedded zoo weights are missing or fail their checksums (mmspec run)

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}  success
  {EXIT_NOT_IDENTICAL}  the speculative output differs from the reference (text at temperature 0, vlm --check, run)
  {EXIT_BAD_INPUT}  bad arguments or input (non-finite or out-of-range numbers, empty prompt, unreadable
     image, a model path that cannot be loaded, an input error reported by the library)
  {EXIT_OUTPUT}  --out cannot be written (an existing file, a path under a file, no permission)
  {EXIT_ZOO}  the embedded zoo weights are missing or fail their checksums
"""


class CLIError(Exception):
    """A failure the CLI reports as one line on stderr and an exit code (``main`` returns ``code``)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class CLIExit(SystemExit):
    """``SystemExit(code)`` whose ``str`` is its one-line message (already printed on stderr)."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit ``EXIT_BAD_INPUT``) and the exit codes in every help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", EXIT_CODES_HELP)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_number(args: argparse.Namespace, dest: str, *, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, integer: bool = False) -> None:
    """``args.<dest>`` (None = not given) must be finite and inside the range, else :class:`CLIError`."""
    value = getattr(args, dest)
    if value is None:
        return
    ok = math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        parts = [f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else "", f"<= {hi:g}" if hi is not None else ""]
        bound = " and ".join(p for p in parts if p)
        kind = "an integer" if integer else "a number"
        flag = "--" + dest.replace("_", "-") if dest != "k" else "-k/--num-draft-tokens"
        raise CLIError(EXIT_BAD_INPUT, f"{dest} must be {kind} {bound}, got {value} ({flag})".replace("  ", " "))


def _looks_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith(("./", "../", "~")) or path in (".", "..") or os.path.exists(path)


def _check_model_path(flag: str, path: str | None, what: str = "checkpoint", *, local_only: bool = False) -> None:
    """A local-looking model path (any path with ``local_only``) must be an existing directory; hub names
    are checked when loading."""
    if path is None:
        return
    if not path.strip():
        raise CLIError(EXIT_BAD_INPUT, f"{flag} is empty")
    local = os.path.expanduser(path)
    if (local_only or _looks_local(path)) and not os.path.isdir(local):
        why = "not a directory" if os.path.exists(local) else "no such directory"
        raise CLIError(EXIT_BAD_INPUT, f"{flag}: no {what} at {path} ({why})")


def _load(what: str, path: str, fn):
    """``fn(path)``, with a one-line :class:`CLIError` when the checkpoint cannot be loaded."""
    try:
        return fn(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(EXIT_BAD_INPUT, f"cannot load the {what} from {path!r}: {_one_line(exc)}") from None


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Raise :class:`CLIError` (``EXIT_OUTPUT``) unless ``path`` is, or can be created as, a writable
    directory. Checked by trying: missing directories are created, probed with a temporary file and
    removed again, so a later failure leaves nothing behind."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(EXIT_OUTPUT, f"{flag} {out} exists and is not a directory")
    missing, base = [], out
    while not base.exists() and base != base.parent:
        missing.append(base)
        base = base.parent
    if not base.is_dir():
        raise CLIError(EXIT_OUTPUT, f"{flag} {out}: {base} is not a directory")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as exc:
                raise CLIError(EXIT_OUTPUT, f"{flag} {out}: cannot create directory {d}: "
                                            f"{exc.strerror or _one_line(exc)}") from None
            created.append(d)
        try:
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as exc:
            raise CLIError(EXIT_OUTPUT, f"cannot write to {flag} {out}: {exc.strerror or _one_line(exc)}") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
    return out


def _example_models(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.15)
    target = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # damp the later layers so that the first layer alone predicts the target often
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(0.2)
            layer.mlp.down_proj.weight.mul_(0.2)
    draft_cfg = LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 1})
    drafter = LlamaForCausalLM(draft_cfg).eval()
    # the drafter is the target's first layer with its embeddings, final norm and head
    state = {k: v for k, v in target.state_dict().items() if "layers." not in k or k.startswith("model.layers.0.")}
    drafter.load_state_dict(state)
    for m in (target, drafter):
        m.generation_config.eos_token_id = None
    return target, drafter


EXAMPLE_PROMPT = "speculative decoding drafts, the target verifies; speculative decoding drafts, the target verifies"


def _check_sampling(args: argparse.Namespace) -> None:
    """Decoding numbers shared by the subcommands (only those the subcommand has)."""
    limits = {"max_new_tokens": dict(lo=1, integer=True), "k": dict(lo=1, integer=True), "temperature": dict(lo=0),
              "top_k": dict(lo=0, integer=True), "top_p": dict(lo=0, hi=1, lo_open=True)}
    for dest, kw in limits.items():
        if hasattr(args, dest):
            _check_number(args, dest, **kw)


def _check_text_args(args: argparse.Namespace) -> None:
    if args.example:
        for flag, value in (("--target", args.target), ("--drafter", args.drafter), ("--tokenizer", args.tokenizer)):
            if value is not None:
                raise CLIError(EXIT_BAD_INPUT, f"{flag} cannot be combined with --example (the built-in toy pair)")
    if args.target is None and not args.example and args.tokenizer is not None:
        raise CLIError(EXIT_BAD_INPUT, "--tokenizer needs --target (the default SmolLM2 brings its own)")
    if args.drafter is not None and args.prompt_lookup:
        raise CLIError(EXIT_BAD_INPUT, "give --drafter or --prompt-lookup, not both")
    for flag, path in (("--target", args.target), ("--drafter", args.drafter), ("--tokenizer", args.tokenizer)):
        _check_model_path(flag, path)
    _check_sampling(args)
    if args.prompt is not None and not args.prompt.strip():
        raise CLIError(EXIT_BAD_INPUT, "--prompt is empty")


def _run_text(args: argparse.Namespace) -> int:
    import mmspec

    _check_text_args(args)
    tokenizer = None
    attention_mask = None
    if not args.example and args.target is None:  # the real default: SmolLM2 with its shipped EAGLE-3 head
        from mmspec.pretrained import ModelNotFoundError, chat_inputs, load_causal_lm
        from mmspec.zoo.smollm2 import load_smollm2_drafter

        try:
            target, tokenizer = load_causal_lm()
        except ModelNotFoundError as exc:
            raise CLIError(EXIT_BAD_INPUT, f"{_one_line(exc)} (or use --example for the built-in toy pair)") from None
        if args.prompt_lookup:
            drafter = "prompt_lookup"
        elif args.drafter:
            drafter = _load("drafter model", args.drafter,
                            lambda p: __import__("transformers").AutoModelForCausalLM.from_pretrained(p).eval())
        else:
            drafter = load_smollm2_drafter("head", target)
        enc = chat_inputs(tokenizer, [args.prompt or "Give me three tips for staying focused while studying."])
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    elif args.target:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        def causal_lm(path):
            return AutoModelForCausalLM.from_pretrained(path).eval()

        target = _load("target model", args.target, causal_lm)
        drafter = "prompt_lookup" if args.prompt_lookup or not args.drafter else \
            _load("drafter model", args.drafter, causal_lm)
        tokenizer = _load("tokenizer", args.tokenizer or args.target, AutoTokenizer.from_pretrained)
        if not isinstance(drafter, str):
            try:
                mmspec.check_same_tokenizer(tokenizer, _load("drafter tokenizer", args.drafter,
                                                             AutoTokenizer.from_pretrained))
            except mmspec.MMSpecError as exc:
                raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
        input_ids = tokenizer(args.prompt or "Once upon a time", return_tensors="pt").input_ids
    else:
        target, drafter = _example_models(args.seed)
        if args.prompt_lookup:
            drafter = "prompt_lookup"
        input_ids = torch.tensor([list((args.prompt or EXAMPLE_PROMPT).encode("utf-8"))], dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p)
    try:
        t0 = time.perf_counter()
        out = mmspec.generate(target, input_ids, attention_mask=attention_mask, drafter=drafter, num_draft_tokens=args.k,
                              generator=gen, **common)
        t_spec = time.perf_counter() - t0
    except mmspec.MMSpecError as exc:
        raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
    new = out.sequences[0, input_ids.shape[1]:]
    print("generated tokens:", new.tolist())
    if tokenizer is not None:
        print("generated text:", tokenizer.decode(new, skip_special_tokens=True))
    print("mmspec:", out.stats.summary())
    print("acceptance per draft position:", [round(a, 3) for a in out.stats.acceptance_per_position])
    if args.temperature == 0.0:
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = target.generate(input_ids, attention_mask=torch.ones_like(input_ids) if attention_mask is None
                                  else attention_mask, do_sample=False,
                                  max_new_tokens=args.max_new_tokens,
                                  pad_token_id=target.generation_config.pad_token_id or 0)
        t_ar = time.perf_counter() - t0
        same = ref.shape[1] <= out.sequences.shape[1] and torch.equal(ref, out.sequences[:, : ref.shape[1]])
        print(f"plain AR (HF generate): {t_ar:.2f}s; speculative: {t_spec:.2f}s; "
              f"speedup x{t_ar / t_spec:.2f}; identical to AR: {same}")
        if not same:
            return EXIT_NOT_IDENTICAL
    return EXIT_OK


def _load_image(path: str):
    """The image as RGB; an unreadable image prints one line and raises :class:`CLIExit`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")  # grayscale / RGBA / palette images become RGB
    except (FileNotFoundError, IsADirectoryError):
        message = f"error: image file not found: {path}"
    except (UnidentifiedImageError, OSError) as exc:
        message = f"error: cannot read image {path!r}: {_one_line(exc)}"
    print(message, file=sys.stderr)
    raise CLIExit(EXIT_BAD_INPUT, message)


def _run_vlm(args: argparse.Namespace) -> int:
    import mmspec
    import mmspec.vision as mv
    from transformers import AutoModelForImageTextToText, AutoProcessor

    for flag, path in (("--target", args.target), ("--drafter", args.drafter), ("--processor", args.processor)):
        _check_model_path(flag, path)
    _check_sampling(args)
    _check_number(args, "keep_ratio", lo=0, hi=1)
    if not args.prompt.strip():
        raise CLIError(EXIT_BAD_INPUT, "--prompt is empty")
    image = _load_image(args.image)

    def vlm(path):  # SDPA: the verifier-guided pruning captures the attention it needs under SDPA
        return AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()

    processor = _load("processor", args.processor or args.target, AutoProcessor.from_pretrained)
    target = _load("target model", args.target, vlm)
    drafter = _load("drafter model", args.drafter, vlm) if args.drafter else target
    image_token = getattr(processor, "image_token", "<image>")
    prompt = args.prompt if image_token in args.prompt else f"{image_token} {args.prompt}"
    try:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
    except Exception as exc:  # the processor's own message names the problem
        raise CLIError(EXIT_BAD_INPUT, f"the processor cannot prepare this image/prompt: {_one_line(exc)}") from None
    dtype = next(target.parameters()).dtype
    inputs = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
    try:
        out = mv.generate(target, drafter, inputs, pruning=args.pruning, keep_ratio=args.keep_ratio,
                          max_new_tokens=args.max_new_tokens, num_draft_tokens=args.k,
                          temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed))
    except mmspec.MMSpecError as exc:
        raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    print("generated text:", processor.decode(new, skip_special_tokens=True))
    print("mmspec:", out.stats.summary())
    print("visual tokens: target", out.stats.extra.get("visual_tokens"), "drafter",
          out.stats.extra.get("drafter_visual_tokens"))
    if args.check and args.temperature == 0.0:
        with torch.no_grad():
            ref = target.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens)
        same = torch.equal(ref, out.sequences)
        print("identical to target.generate:", same)
        return EXIT_OK if same else EXIT_NOT_IDENTICAL
    return EXIT_OK


def _check_imagegen_args(args: argparse.Namespace) -> None:
    """Argument-level checks of ``mmspec imagegen`` (the library checks what depends on the models)."""
    if args.prompt is not None and args.class_ids:
        raise CLIError(EXIT_BAD_INPUT, "give --class or --prompt, not both")
    if args.prompt is None and not args.class_ids:
        raise CLIError(EXIT_BAD_INPUT, "give a condition: --class ID (class-conditional) or --prompt TEXT")
    for flag, path, what in (("--model", args.model, "AR image model"), ("--tokenizer", args.tokenizer, "VQ tokenizer"),
                             ("--drafter", args.drafter, "AR image model or EAGLE head")):
        _check_model_path(flag, path, what, local_only=True)
    _check_sampling(args)
    _check_number(args, "num_images", lo=1, integer=True)
    _check_number(args, "cfg_scale", lo=0)
    _check_number(args, "lantern_k", lo=1, integer=True)
    _check_number(args, "lantern_delta", lo=0, hi=1)
    _check_number(args, "lantern_lambda", lo=1)
    _check_number(args, "mulo_tau", lo=0)
    _check_number(args, "mulo_l", lo=0, integer=True)
    _check_number(args, "mulo_k", lo=1, integer=True)
    _check_number(args, "mulo_scale", lo=1, integer=True)
    check_out_dir(args.out)


class _PlaceholderResampler:  # stands for --resampler while the parameters are checked (nothing loaded yet)
    scale = 2

    def upsample(self, low):  # pragma: no cover - never called
        raise NotImplementedError

    def downsample(self, high):  # pragma: no cover - never called
        raise NotImplementedError


_PLACEHOLDER_RESAMPLER = _PlaceholderResampler()


def _run_imagegen(args: argparse.Namespace) -> int:
    import json

    import mmspec
    import mmspec.image_gen as ig

    _check_imagegen_args(args)
    # the method's parameters are passed only when given: unset ones take the method's defaults, and one
    # the method does not use is the library's named error (mmspec.image_gen.METHODS declares them)
    method_args = {name: getattr(args, dest) for name, dest in (
        ("num_draft_tokens", "k"), ("lantern_k", "lantern_k"), ("lantern_delta", "lantern_delta"),
        ("lantern_lambda", "lantern_lambda"), ("mulo_tau", "mulo_tau"), ("mulo_l", "mulo_l"),
        ("mulo_k", "mulo_k"), ("mulo_scale", "mulo_scale")) if getattr(args, dest) is not None}
    try:  # the registry checks the method's parameters before any model is loaded
        get_method(args.method).resolve({**method_args, "drafter": args.drafter or None,
                                         "mulo_resampler": _PLACEHOLDER_RESAMPLER if args.resampler else None})
    except mmspec.MMSpecError as exc:
        raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
    try:
        target = ig.ARImageModel.from_pretrained(args.model)
        tokenizer = ig.VQTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
        if args.drafter:  # an AR image model or an EAGLE head folder
            method_args["drafter"] = ig.load_image_drafter(args.drafter, target)
        if args.resampler:
            from mmspec.image_gen.token_resampler import TokenResampler

            method_args["mulo_resampler"] = TokenResampler.from_pretrained(args.resampler)
        condition = args.prompt if args.prompt is not None else args.class_ids
        out = ig.generate(target, tokenizer, condition=condition, method=args.method, cfg_scale=args.cfg_scale,
                          cfg_schedule=args.cfg_schedule, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed),
                          num_images=args.num_images, progress=True, **method_args)
    except (mmspec.MMSpecError, FileNotFoundError, OSError) as exc:
        raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
    outdir = Path(args.out).expanduser()
    files = []
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        for i, cond in enumerate(out.conditions):
            if out.images is not None:
                name = f"image_{i:03d}.png"
                out.images[i].save(outdir / name)
                files.append(name)
        heatmap_image(out.stats.accepted_map).save(outdir / "acceptance_heatmap.png")
        stats = out.stats.as_dict()
        stats.update(method=args.method, conditions=out.conditions, images=files, seed=args.seed,
                     tokens=out.tokens.tolist())
        (outdir / "stats.json").write_text(json.dumps(stats, indent=2))
    except OSError as exc:
        raise CLIError(EXIT_OUTPUT, f"cannot write to --out {outdir}: {exc.strerror or _one_line(exc)}") from None
    print(f"{len(out.conditions)} image(s) -> {outdir}: {out.stats.summary()}; "
          f"target forwards per image {out.stats.target_forwards_per_image:.1f}")
    return EXIT_OK


def imagegen_main(argv: list[str] | None = None) -> int:
    """Console entry point ``mmspec-imagegen`` (same as ``mmspec imagegen``)."""
    return main(["imagegen", *(sys.argv[1:] if argv is None else argv)])


def _run_main_job(args: argparse.Namespace) -> int:
    import mmspec
    from mmspec.zoo.main_job import MainJobConfig, run_main_job
    from mmspec.zoo import ZooError

    if args.prompt is not None and not args.prompt.strip():
        raise CLIError(EXIT_BAD_INPUT, "--prompt is empty")
    _check_number(args, "num_images", lo=1, integer=True)
    _check_number(args, "keep_ratio", lo=0, hi=1)
    check_out_dir(args.out)
    cfg = MainJobConfig(pruning=args.pruning, keep_ratio=args.keep_ratio, prompt=args.prompt,
                        image_method=args.method, num_images=args.num_images, seed=args.seed,
                        vlm_drafter=args.vlm_drafter, vlm_grid=args.vlm_grid)
    try:
        report = run_main_job(args.out, cfg)
    except ZooError as exc:
        raise CLIError(EXIT_ZOO, _one_line(exc)) from None
    except mmspec.MMSpecError as exc:
        raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
    same = report["vlm"]["identical_to_hf_generate"] and report["text"].get("identical_to_hf_generate", True)
    return EXIT_OK if same else EXIT_NOT_IDENTICAL


def parse_tree(spec: str):
    """``"depth,top_k,nodes"`` -> a :class:`~mmspec.drafters.tree.DynamicTree` (ValueError otherwise)."""
    from mmspec.drafters.tree import DynamicTree

    try:
        parts = tuple(int(x) for x in spec.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError(f"tree must be three ints >= 1 as depth,top_k,nodes (e.g. 5,4,16); got {spec!r}")
    depth, top_k, nodes = parts
    return DynamicTree(depth=depth, top_k=top_k, num_nodes=nodes)


def _run_chat(args: argparse.Namespace) -> int:
    """Interactive chat (stdin lines; ``/reset`` forgets the conversation, ``/exit`` or EOF ends it)."""
    import mmspec
    from mmspec.chat import Chat
    from mmspec.pretrained import ModelNotFoundError, load_causal_lm
    from mmspec.zoo.smollm2 import chat_drafter

    _check_sampling(args)
    try:
        tree = None if args.chain else parse_tree(args.tree)
    except ValueError as exc:
        raise CLIError(EXIT_BAD_INPUT, f"--tree: {exc}") from None
    shipped = args.drafter in ("head", "model")
    if shipped and args.target != "smollm2":
        raise CLIError(EXIT_BAD_INPUT, f"--drafter {args.drafter} is the one shipped for SmolLM2; for another "
                                       "target give a folder from `mmspec train-drafter` or prompt-lookup")
    if not shipped and args.drafter != "prompt-lookup":
        _check_model_path("--drafter", args.drafter, "trained drafter folder", local_only=True)
    try:
        target, tokenizer = load_causal_lm(args.target)
    except (ModelNotFoundError, OSError, ValueError, KeyError) as exc:
        raise CLIError(EXIT_BAD_INPUT, f"cannot load the target from {args.target!r}: {_one_line(exc)}") from None
    if not args.no_pack:  # CPU: linear weights packed once for oneDNN (mmspec.cpu_packing)
        from mmspec.cpu_packing import pack_linear_weights

        pack_linear_weights(target)
    try:
        drafter = chat_drafter(args.drafter, target, tree)
        chat = Chat(target, tokenizer, drafter, system=args.system, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, num_draft_tokens=args.k,
                    seed=args.seed)
    except (mmspec.MMSpecError, ValueError, FileNotFoundError) as exc:
        raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
    interactive = sys.stdin.isatty()
    if interactive:
        print("mmspec chat: type a message; /reset forgets the conversation, /exit (or Ctrl-D) ends it.")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            chat.reset()
            print("(conversation cleared)")
            continue
        print("assistant> ", end="", flush=True)
        try:
            for piece in chat.reply(line):
                print(piece, end="", flush=True)
        except mmspec.MMSpecError as exc:
            raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
        print()
        if not args.quiet:
            print(f"  [{chat.last.summary()}]", file=sys.stderr)
    return EXIT_OK


def _run_train_drafter(args: argparse.Namespace) -> int:
    from mmspec.distill import train_drafter
    from mmspec.pretrained import ModelNotFoundError, load_causal_lm

    _check_number(args, "minutes", lo=0, lo_open=True)
    _check_number(args, "num_prompts", lo=17, integer=True)
    _check_number(args, "draft_vocab", lo=1, integer=True)
    _check_number(args, "layers", lo=1, integer=True)
    _check_number(args, "num_heads", lo=1, integer=True)
    _check_number(args, "max_new_tokens", lo=1, integer=True)
    if not args.target.strip():
        raise CLIError(EXIT_BAD_INPUT, "--target is empty")
    check_out_dir(args.out)
    try:
        model, tokenizer = load_causal_lm(args.target)
    except (ModelNotFoundError, OSError, ValueError, KeyError) as exc:
        raise CLIError(EXIT_BAD_INPUT, f"cannot load the target from {args.target!r}: {_one_line(exc)}") from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise CLIError(EXIT_BAD_INPUT, f"the tokenizer of {args.target!r} has no chat template (needed for the "
                                       "self-distillation prompts)")
    summary = train_drafter(model, tokenizer, kind=args.kind, out=args.out, minutes=args.minutes,
                            num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                            draft_vocab_size=args.draft_vocab, num_layers=args.layers, num_heads=args.num_heads,
                            seed=args.seed)
    print(f"{args.kind} drafter written to {args.out}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return EXIT_OK


COLLAB_SHIPPED = ("smollm2", "smollm2-drafter", "smollm2-code", "smollm2-german")


def _load_collab_models(paths: list[str]):
    """(models, tokenizer) for ``--models``: HF checkpoints, ``smollm2``, ``smollm2-code`` / ``smollm2-german``
    (SmolLM2 with the shipped domain LoRA merged) and ``smollm2-drafter`` (the shipped 2-layer drafter around
    SmolLM2's embedding and head); one tokenizer checked against every model's."""
    import mmspec
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models, tokenizers, smollm2 = [], [], None
    for path in paths:
        if path in COLLAB_SHIPPED:
            from mmspec.pretrained import ModelNotFoundError, load_causal_lm
            from mmspec.zoo.smollm2 import load_smollm2_domain, load_smollm2_drafter

            if smollm2 is None:
                try:
                    smollm2 = load_causal_lm()
                except ModelNotFoundError as exc:
                    raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
            if path == "smollm2":
                models.append(smollm2[0])
            elif path == "smollm2-drafter":
                models.append(load_smollm2_drafter("model", smollm2[0]))
            else:
                models.append(load_smollm2_domain(path.split("-", 1)[1]))
            tokenizers.append(smollm2[1])
        else:
            _check_model_path("--models", path)
            models.append(_load("model", path, lambda p: AutoModelForCausalLM.from_pretrained(p).eval()))
            tokenizers.append(_load("tokenizer", path, AutoTokenizer.from_pretrained))
    try:
        for tok in tokenizers[1:]:
            mmspec.check_same_tokenizer(tokenizers[0], tok)
    except mmspec.MMSpecError as exc:
        raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
    return models, tokenizers[0]


def _run_collaborate(args: argparse.Namespace) -> int:
    import mmspec
    from mmspec import collaborative as co
    from mmspec.pretrained import chat_inputs

    _check_sampling(args)
    if args.prompt is not None and not args.prompt.strip():
        raise CLIError(EXIT_BAD_INPUT, "--prompt is empty")
    if len(args.models) < 2:
        raise CLIError(EXIT_BAD_INPUT, f"--models needs at least 2 models, got {len(args.models)}")
    n = len(args.models)
    try:
        if args.combine == "ensemble":
            combine = co.WeightedEnsemble(tuple(args.weights) if args.weights else tuple([1.0 / n] * n))
        else:
            combine = co.ContrastiveDecoding(alpha=args.alpha, plausibility=args.plausibility)
        gammas = tuple(args.gamma) if args.gamma else None
        if args.proposal == "none":
            proposal = None
        elif args.proposal == "fixed":
            proposer = args.proposer if args.proposer is not None else 0
            if gammas is not None and len(gammas) != n:
                raise CLIError(EXIT_BAD_INPUT, f"--gamma gives {len(gammas)} proposal lengths for {n} models")
            proposal = co.FixedProposer(proposer, gammas[proposer] if gammas and proposer < n else 3)
        else:
            proposal = co.AlternateProposals(gammas or tuple([2] * n))
        combine.check_models(n)
        if proposal is not None:
            proposal.gammas(n)
    except mmspec.MMSpecError as exc:
        raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
    models, tokenizer = _load_collab_models(args.models)
    if args.pack:  # multi-token forwards (verification) cost about one single-token forward once packed
        from mmspec.cpu_packing import pack_linear_weights

        for model in {id(m): m for m in models}.values():
            pack_linear_weights(model)
    enc = chat_inputs(tokenizer, [args.prompt or "Give me three tips for staying focused while studying."])
    common = dict(combine=combine, attention_mask=enc["attention_mask"], max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    try:
        t0 = time.perf_counter()
        out = co.generate(models, enc["input_ids"], proposal=proposal, **common)
        t_spec = time.perf_counter() - t0
    except mmspec.MMSpecError as exc:
        raise CLIError(EXIT_BAD_INPUT, _one_line(exc)) from None
    new = out.sequences[0, enc["input_ids"].shape[1]:]
    print("generated text:", tokenizer.decode(new, skip_special_tokens=True))
    print("mmspec:", out.stats.summary())
    print("forwards per model:", out.stats.extra.get("calls_per_model"))
    if proposal is not None and args.compare:
        t0 = time.perf_counter()
        ref = co.generate(models, enc["input_ids"], proposal=None, **common)
        t_std = time.perf_counter() - t0
        line = f"standard collaborative decoding: {t_std:.2f}s; CoS ({args.proposal}): {t_spec:.2f}s; " \
               f"speedup x{t_std / t_spec:.2f}"
        if args.temperature == 0.0:
            same = torch.equal(ref.sequences, out.sequences)
            print(f"{line}; identical: {same}")
            if not same:
                return EXIT_NOT_IDENTICAL
        else:
            print(line)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmspec", description="Speculative decoding for multimodal models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the main job on the embedded models: describe a scene with the VLM on SmolLM2 "
                                     "(pruned drafter), draw images (AR vs a relaxed method), chat with SmolLM2")
    run.add_argument("--out", default="mmspec_out", help="directory for the images, heat-map and report.json")
    run.add_argument("--prompt", default=None, help="image prompt (default: a held-out scene's caption)")
    run.add_argument("--method", default="mulo", choices=[m for m in METHOD_NAMES if m != "ar"],
                     help="the relaxed image method (default: MuLo-SD, the fastest within the quality floor)")
    run.add_argument("--pruning", default="verifier", choices=["verifier", "cls", "diversity", "uniform", "none"])
    run.add_argument("--keep-ratio", type=float, default=0.25)
    run.add_argument("--vlm-drafter", default="head", choices=["head", "model"],
                     help="the VLM's drafter: its EAGLE-3 head (default) or the small distilled VLM")
    run.add_argument("--vlm-grid", type=int, default=1, help="4: tile the image (1088 visual tokens)")
    run.add_argument("--num-images", type=int, default=4)
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=_run_main_job)
    text = sub.add_parser("text", help="speculative decoding of a causal LM with a drafter or prompt lookup "
                                       "(default: SmolLM2-135M-Instruct with its shipped EAGLE-3 head)")
    text.add_argument("--target", help="HF checkpoint of the target (default: SmolLM2-135M-Instruct, chat prompt)")
    text.add_argument("--example", action="store_true", help="the built-in toy pair instead (random Llama, byte ids)")
    text.add_argument("--drafter", help="HF checkpoint of the drafter (same vocabulary as the target)")
    text.add_argument("--tokenizer", help="tokenizer path (default: the target's)")
    text.add_argument("--prompt-lookup", action="store_true", help="draft by prompt lookup instead of a model")
    text.add_argument("--prompt", default=None, help="the prompt (a chat turn for SmolLM2)")
    text.add_argument("--max-new-tokens", type=int, default=64)
    text.add_argument("-k", "--num-draft-tokens", dest="k", type=int, default=3)
    text.add_argument("--temperature", type=float, default=0.0)
    text.add_argument("--top-k", type=int, default=None)
    text.add_argument("--top-p", type=float, default=None)
    text.add_argument("--seed", type=int, default=0)
    text.set_defaults(func=_run_text)

    col = sub.add_parser("collaborate", help="collaborative decoding of several models (weighted ensemble or "
                                             "contrastive decoding), sped up losslessly by speculation (CoS)")
    col.add_argument("--models", nargs="+", default=["smollm2", "smollm2-code"],
                     help="HF checkpoints sharing one tokenizer, or the shipped smollm2, smollm2-code, smollm2-german, "
                          "smollm2-drafter (default: smollm2 smollm2-code, a general and a code model)")
    col.add_argument("--combine", default="ensemble", choices=["ensemble", "contrastive"])
    col.add_argument("--weights", nargs="+", type=float, help="ensemble weights, one per model, sum 1 (default equal)")
    col.add_argument("--alpha", type=float, default=0.1, help="contrastive: expert (model 1) - alpha x amateur (model 2)")
    col.add_argument("--plausibility", type=float, default=None,
                     help="contrastive: keep tokens the expert gives >= this x its top probability (default: no cut)")
    col.add_argument("--proposal", default="alternate", choices=["alternate", "fixed", "none"],
                     help="alternate proposals (default), one fixed proposer, or none (standard collaborative decoding)")
    col.add_argument("--gamma", nargs="+", type=int,
                     help="proposal lengths, one per model (default: 2 each, the fastest measured for models of one "
                          "size; give a cheap model a longer one)")
    col.add_argument("--proposer", type=int, default=None, help="--proposal fixed: index of the proposer (default: 0)")
    col.add_argument("--prompt", default=None, help="the prompt (one chat turn)")
    col.add_argument("--max-new-tokens", type=int, default=64)
    col.add_argument("--temperature", type=float, default=0.0)
    col.add_argument("--top-k", type=int, default=None)
    col.add_argument("--top-p", type=float, default=None)
    col.add_argument("--seed", type=int, default=0)
    col.add_argument("--no-pack", dest="pack", action="store_false",
                     help="keep the linear layers' BLAS path (default: pre-pack float32 CPU weights for oneDNN)")
    col.add_argument("--no-compare", dest="compare", action="store_false",
                     help="skip the standard collaborative decoding run (speedup, and identity when greedy)")
    col.set_defaults(func=_run_collaborate)

    vlm = sub.add_parser("vlm", help="VLM speculative decoding with a pruned drafter (HF checkpoints)")
    vlm.add_argument("--target", required=True, help="HF VLM checkpoint (LLaVA, LLaVA-NeXT, Qwen2-VL, ...)")
    vlm.add_argument("--drafter", help="smaller VLM of the same family (default: the target itself)")
    vlm.add_argument("--processor", help="processor path (default: the target's)")
    vlm.add_argument("--image", required=True)
    vlm.add_argument("--prompt", required=True)
    vlm.add_argument("--pruning", default="verifier", choices=["verifier", "cls", "diversity", "uniform", "none"])
    vlm.add_argument("--keep-ratio", type=float, default=0.25)
    vlm.add_argument("--max-new-tokens", type=int, default=64)
    vlm.add_argument("-k", "--num-draft-tokens", dest="k", type=int, default=4)
    vlm.add_argument("--temperature", type=float, default=0.0)
    vlm.add_argument("--seed", type=int, default=0)
    vlm.add_argument("--check", action="store_true", help="also run target.generate and compare (greedy)")
    vlm.set_defaults(func=_run_vlm)

    td = sub.add_parser("train-drafter", help="train a drafter for a causal LM by self-distillation: an EAGLE-3 "
                                              "head (--kind head), a small drafter LM (--kind model) or "
                                              "blockwise parallel heads (--kind heads)")
    td.add_argument("--target", default="smollm2", help="HF folder, .gguf file or 'smollm2' (default)")
    td.add_argument("--kind", default="head", choices=["head", "model", "heads"])
    td.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget (data + training); "
                                                                 "re-running with the same --out continues")
    td.add_argument("--out", default="mmspec_drafter", help="run directory (data, checkpoints, the drafter)")
    td.add_argument("--num-prompts", type=int, default=1024, help="self-distillation prompts (stdlib docstrings)")
    td.add_argument("--max-new-tokens", type=int, default=160, help="answer length per prompt")
    td.add_argument("--draft-vocab", type=int, default=4096, help="FR-Spec draft vocabulary size (head, heads)")
    td.add_argument("--num-heads", type=int, default=4, help="blockwise heads: tokens proposed per block (heads)")
    td.add_argument("--layers", type=int, default=2, help="decoder layers of the distilled drafter (model)")
    td.add_argument("--seed", type=int, default=0)
    td.set_defaults(func=_run_train_drafter)

    chat = sub.add_parser("chat", help="chat with SmolLM2-135M-Instruct (or --target) through speculative "
                                       "decoding, answers streamed (reads stdin; /reset, /exit)")
    chat.add_argument("--target", default="smollm2", help="HF folder, .gguf file or 'smollm2' (default)")
    chat.add_argument("--drafter", default="head",
                      help="head (shipped EAGLE-3 head, default), model (shipped distilled drafter), prompt-lookup, "
                           "or a folder written by `mmspec train-drafter`")
    chat.add_argument("--tree", default="5,4,16", help="dynamic draft tree of a head: depth,top_k,nodes")
    chat.add_argument("--chain", action="store_true", help="draft chains of -k tokens instead of trees")
    chat.add_argument("-k", "--num-draft-tokens", dest="k", type=int, default=3)
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-k", type=int, default=None)
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--quiet", action="store_true", help="no speed line after each answer")
    chat.add_argument("--no-pack", action="store_true",
                      help="keep the target's linear weights as they are (default: packed for oneDNN on a CPU, "
                           "which makes verifying several tokens cheaper)")
    chat.set_defaults(func=_run_chat)

    img = sub.add_parser("imagegen", help="generate images with an AR image model (AR, exact SD, SJD, LANTERN, "
                                          "LANTERN++, MuLo-SD)")
    img.add_argument("--model", required=True, help="AR image model directory (ARImageModel.save_pretrained)")
    img.add_argument("--tokenizer", help="VQ tokenizer directory (to write PNGs)")
    img.add_argument("--drafter", help="smaller AR image model or an EAGLE head folder (exact, lantern); low-resolution model (mulo)")
    img.add_argument("--class", dest="class_ids", type=int, action="append", default=[], help="class id (repeatable)")
    img.add_argument("--prompt", help="prompt for a text-conditional model")
    img.add_argument("--method", default="sjd", choices=list(METHOD_NAMES))
    method_default = " (default: the method's; an option the method does not use is an error)"
    img.add_argument("-k", "--num-draft-tokens", dest="k", type=int, default=None,
                     help="drafted tokens per step / SJD window" + method_default)
    img.add_argument("--lantern-k", type=int, default=None,
                     help="latent neighbours per codebook entry (lantern, lantern++)" + method_default)
    img.add_argument("--lantern-delta", type=float, default=None, help="LANTERN total-variation budget in [0, 1]")
    img.add_argument("--lantern-lambda", type=float, default=None, help="LANTERN++ multiplicative cap, >= 1")
    img.add_argument("--mulo-tau", type=float, default=None, help="MuLo-SD pooled-probability threshold, >= 0")
    img.add_argument("--mulo-l", type=int, default=None, help="MuLo-SD resampling neighbourhood radius, >= 0")
    img.add_argument("--mulo-k", type=int, default=None, help="MuLo-SD latent neighbours per codebook entry")
    img.add_argument("--mulo-scale", type=int, default=None,
                     help="MuLo-SD resolution ratio (checked against the drafter's grid)")
    img.add_argument("--resampler", help="MuLo-SD's learned U_r / D_r directory (TokenResampler.save_pretrained; "
                                          "default: decode -> resize -> re-encode)")
    img.add_argument("--cfg-scale", type=float, default=4.0)
    img.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"])
    img.add_argument("--temperature", type=float, default=1.0)
    img.add_argument("--top-k", type=int, default=None)
    img.add_argument("--top-p", type=float, default=None)
    img.add_argument("--seed", type=int, default=0)
    img.add_argument("--num-images", type=int, default=1)
    img.add_argument("--out", default="out/images")
    img.set_defaults(func=_run_imagegen)

    pipe = sub.add_parser("pipeline", add_help=False,
                          help="the target split over torchrun processes (pipelined SD, FlowSpec): "
                               "torchrun --nproc-per-node N -m mmspec pipeline ... (--help for its options)")
    pipe.add_argument("args", nargs=argparse.REMAINDER)
    pipe.set_defaults(func=_run_pipeline)
    return parser


def _run_pipeline(args: argparse.Namespace) -> int:
    from .pipeline import main as pipeline_main

    return pipeline_main(args.args)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (``EXIT_*``). A failure prints one line on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pipeline"]:  # its own parser (the options of every torchrun process)
        from .pipeline import main as pipeline_main

        return pipeline_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
