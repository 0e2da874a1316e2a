"""The public Python API: `moecli.load(path) -> Model`, then tokenize / logits / generate."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from moecli.chat import harmony
from moecli.chat_template import render
from moecli.devices import resolve_device
from moecli.errors import MoecliError
from moecli.models.layers import restore_state, save_state
from moecli.models.loader import GGUF_ARCHS, load_checkpoint
from moecli.runtime.experts import TorchExperts
from moecli.runtime.sampling import Sampler, SamplingParams
from moecli.tokenizer import GGUFTokenizer, HFTokenizer, TextStream


from moecli.runtime.exact import DEFAULT_REPACK, Kernels  # noqa: F401 (DEFAULT_REPACK: its old home)


class Session:
    """A conversation's KV cache and the tokens in it, so the next turn only computes its new tokens.

    Models with recurrent layers (Gated DeltaNet) cannot cut their cache at any position: their state stands for
    the whole sequence. As llama.cpp, the session keeps copies of that state at turn boundaries (after each prompt,
    and where the next turn starts), the last CHECKPOINTS of them, and reuses a prefix only up to such a copy; else
    it computes the prompt again from the start."""
    CHECKPOINTS = 4

    def __init__(self, model: "Model", n_ctx: int | None = None):
        self.cache = model.transformer.new_cache(n_ctx)
        self.tokens: list[int] = []
        self.recurrent = getattr(self.cache, "conv", None) is not None
        self.checkpoints: list = []  # save_state copies, oldest first

    @property
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    def reset(self) -> None:
        self.cache.pos = 0
        self.tokens = []
        self.checkpoints = []

    def checkpoint(self) -> None:
        """Keep a copy of the recurrent state where the session is now (no-op without recurrent layers)."""
        if not self.recurrent or not self.tokens or self.cache.state_pos != len(self.tokens):
            return
        self.checkpoints = [c for c in self.checkpoints if c[0] != len(self.tokens)]
        self.checkpoints.append(save_state(self.cache))
        del self.checkpoints[:-self.CHECKPOINTS]

    def reuse(self, tokens: list[int]) -> list[int]:
        """Keep the cached prefix `tokens` shares with this session; return the tokens still to compute (at least
        one: a prompt that is all cached recomputes its last token for fresh logits)."""
        common = common_prefix(self.tokens, tokens)
        if common == len(tokens):
            common -= 1
        if self.recurrent:  # back to the latest state copy within the common prefix (0: from the start)
            self.checkpoint()
            self.checkpoints = [c for c in self.checkpoints if self.tokens[:c[0]] == tokens[:c[0]]]
            usable = [c for c in self.checkpoints if c[0] <= common]
            common = restore_state(self.cache, usable[-1]) if usable else 0
        self.cache.pos, self.tokens = common, list(tokens[:common])
        return list(tokens[common:])

    @property
    def cached(self) -> int:
        """Tokens in the cache now."""
        return len(self.tokens)


class Model:
    def __init__(self, path: str | Path, device: str = "cpu", n_ctx: int | None = None, engine: str = "auto",
                 threads: int | None = None, placement: str | None = None, expert_slots: int = 0, costs=None,
                 flash_attn: bool = True, host_profile: str | Path | None = None, exact: bool = False):
        self.path = Path(path)
        self.checkpoint = load_checkpoint(self.path)
        self.config = self.checkpoint.config
        self.device = torch.device(resolve_device(device))
        if placement is not None:
            engine = "hybrid"
        elif engine == "auto":
            engine = "ggml" if self.device.type == "cpu" else "torch"
        if engine not in ("ggml", "torch", "hybrid"):
            raise MoecliError(f"unknown engine {engine!r} (ggml, torch, hybrid)")
        self.engine = engine
        if exact and engine != "ggml":
            raise MoecliError("exact mode runs llama.cpp's CPU kernels: it takes the CPU engine (no --placement, "
                              f"no GPU), not the {engine} engine")
        kernels = self.kernels = Kernels.choose(exact, flash_attn)
        ctx = _plan_context(self.checkpoint, n_ctx, self.device, engine)
        self.n_ctx, self.notes = ctx.n_ctx, list(ctx.notes)  # notes: one line each for the CLI to print
        n_ctx = ctx.n_ctx
        src = self.checkpoint.source
        self.tokenizer = HFTokenizer(self.path, src.config) if self.path.is_dir() else GGUFTokenizer(src)
        if engine == "ggml":
            if self.device.type != "cpu":
                raise MoecliError("the ggml engine runs on the CPU device only")
            from moecli.kernels import ggml
            from moecli.runtime.cpu_backend import GgmlExperts, GgmlLinear

            ggml.set_threads(threads)
            from moecli.runtime.cpu_backend import repack_weights

            # llama.cpp's interleaved layouts replace the experts' file bytes (no extra memory) for the types whose
            # repacked kernels win or tie at every batch size (see DEFAULT_REPACK); MOECLI_REPACK=... sets them
            # ("none": every file byte stays as it is); exact mode repacks what llama.cpp repacks
            if exact and os.environ.get("MOECLI_REPACK"):
                self.notes.append("exact mode: MOECLI_REPACK ignored (llama.cpp's own repacking)")
            repack_weights(self.checkpoint, kernels.expert_repack_types())
            linear = GgmlLinear
            experts = GgmlExperts(self.checkpoint, kernels.expert_kernel) if self.config.is_moe else None
        elif engine == "hybrid":
            # Experts split between the ggml CPU engine and a device cache; everything else on the device.
            from moecli.kernels import ggml
            from moecli.runtime.executor import HybridExperts

            if not self.config.is_moe:
                raise MoecliError("placements apply to Mixture-of-Experts models; this model is dense")
            from moecli.runtime.cpu_backend import hybrid_threads, repack_weights

            n_threads = ggml.set_threads(threads or hybrid_threads(self.device.type))
            if self.device.type == "cpu":  # the "device" is these cores too: torch's OpenMP team as big as ggml's,
                torch.set_num_threads(n_threads)  # or its idle workers spin while ggml runs (3x slower experts)
            # the CPU experts as CPU-only mode has them: repacked for llama.cpp's interleaved kernels (the device
            # cache copies the file's bytes, which the map still gives)
            repack_weights(self.checkpoint, kernels.expert_repack_types())
            linear = None
            if self.device.type == "cuda":  # a plan that does not fit fails here, before anything is loaded
                _check_device_memory(self.checkpoint, self.path, self.device, placement or "hybrimoe",
                                     expert_slots, n_ctx)
            if costs is None:  # this host's measured costs for this model (or the defaults), refitted as it runs
                from moecli.profile.costs import host_costs

                costs, source = host_costs(self.checkpoint, self.path, profile=host_profile)
            else:
                source = "costs given by the caller"
            self.cost_source = source
            experts = HybridExperts(self.checkpoint, self.device, placement or "hybrimoe", expert_slots, costs)
            experts.cpu.engine.warmup(self.config.n_expert_used)  # decode's graphs prebuilt, as CPU-only mode's
        else:
            linear = None
            experts = TorchExperts(self.checkpoint, self.device) if self.config.is_moe else None
        cls = GGUF_ARCHS[self.config.arch].TRANSFORMER  # the family's torch decoder (most share Transformer)
        self.transformer = cls(self.checkpoint, self.device, experts, linear=linear, max_ctx=n_ctx)
        if engine == "ggml":  # every family has a graph builder (models/<arch>.py build_layer)
            from moecli.runtime import ggml_forward

            if ggml_forward.supported(self.checkpoint, experts):  # the whole forward as one graph, as llama.cpp
                self.transformer.fused_forward = ggml_forward.GgmlForward(self.checkpoint, experts,
                                                                          self.transformer.max_ctx, kernels)
            elif exact:  # the layer-by-layer path attends in torch
                raise MoecliError(f"exact mode: {self.path.name} runs on moecli's layer-by-layer path (its "
                                  "attention is torch's), which cannot match llama.cpp bit for bit")
        if hasattr(experts, "attach"):
            experts.attach(self.transformer)
        self._finite_seen = False  # the first forward pass's logits were checked for NaN/inf

    @property
    def stats(self):
        """Expert placement counters of the hybrid executor (hit rate, CPU/device split...), None otherwise."""
        return getattr(self.transformer.experts, "stats", None)

    @contextlib.contextmanager
    def record_trace(self, path):
        """Record the routing (and the executor's predictions) of everything run inside the block to `path`."""
        from moecli.runtime.trace_recorder import TraceRecorder

        experts = self.transformer.experts
        if not hasattr(experts, "recorder"):
            raise MoecliError("trace recording needs a placement (the hybrid executor): load with placement=...")
        rec = TraceRecorder(self.path.name, self.config.n_expert, self.config.n_expert_used, experts.layers,
                            {"placement": experts.p.name, "slots": experts.slots, "device": self.device.type},
                            experts.known_layers)
        experts.recorder = rec
        try:
            yield rec
        finally:
            experts.recorder = None
            rec.write(path)

    # --- text ---------------------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special)

    def detokenize(self, tokens: list[int], special: bool = True) -> str:
        """Text of `tokens`; control tokens (<|im_end|>...) included unless special=False."""
        return b"".join(self.tokenizer.token_bytes(t, special) for t in tokens).decode("utf-8", "replace")

    @property
    def chat_template(self) -> str | None:
        """The model's own template; gpt-oss files without one get harmony (None: ChatML)."""
        if self.tokenizer.chat_template or self.config.arch != "gpt-oss":
            return self.tokenizer.chat_template
        return harmony.TEMPLATE

    @property
    def harmony(self) -> bool:
        """Whether answers come in harmony channels (gpt-oss): the chat separates reasoning from the answer."""
        return harmony.is_harmony(self.chat_template)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        tok = self.tokenizer
        bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.token_text(tok.eos_id) if tok.eos_id is not None else ""
        return render(self.chat_template, messages, add_generation_prompt, bos_token=bos, eos_token=eos, **extra)

    # --- compute ------------------------------------------------------------------------------------------------
    def logits(self, token_ids: list[int]) -> np.ndarray:
        """One fresh forward over the whole sequence: float32 [n_tokens, n_vocab]."""
        self._check_ids(token_ids)
        cache = self.transformer.new_cache(len(token_ids))
        out = self.transformer.forward(list(token_ids), cache).float().cpu().numpy()
        if not np.isfinite(out).all():
            self._non_finite()
        return out

    def generate(self, prompt: str | list[int], max_tokens: int = 128, temperature: float = 0.0, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
                 session: Session | None = None, stop_at_eog: bool = True) -> Iterator[int]:
        """Yield generated token ids (greedy by default). With a session, tokens already in its cache are reused."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_ids(tokens)
        session = session or Session(self, min(len(tokens) + max_tokens, self.transformer.max_ctx))
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed))
        feed = session.reuse(tokens)
        for _ in range(max_tokens):
            logits = self.step(session, feed)
            token = sampler(logits, session.tokens)
            if stop_at_eog and self.tokenizer.is_eog(token):
                return
            yield token
            feed = [token]

    def step(self, session: Session, feed: list[int]) -> torch.Tensor:
        """Append `feed` to the session and return the next-token logits after it ([n_vocab])."""
        if session.cache.pos + len(feed) > session.n_ctx:
            raise MoecliError(f"context is full ({session.n_ctx} tokens): start a new conversation "
                              "or load the model with a larger context")
        logits = self.transformer.forward(feed, session.cache, all_logits=False)[-1]
        self._check_first(logits)
        session.tokens.extend(feed)
        if len(feed) > 1:  # a prompt: a turn boundary a later turn may go back to
            session.checkpoint()
        return logits

    @property
    def batched(self) -> bool:
        """Whether `step_batch` runs its sequences in one forward pass (the one-graph CPU engine)."""
        return self.transformer.fused_forward is not None

    def step_batch(self, work: list[tuple[Session, list[int]]]) -> list[torch.Tensor]:
        """`step` for several sessions at once, in one forward pass where the engine batches (`batched`): the
        next-token logits after each feed. Each session must be a different one; at most 512 tokens in all."""
        for session, feed in work:
            self._check_ids(feed)
            if session.cache.pos + len(feed) > session.n_ctx:
                raise MoecliError(f"context is full ({session.n_ctx} tokens)")
        logits = self.transformer.forward_batch([(feed, session.cache) for session, feed in work])
        self._check_first(logits)
        for session, feed in work:
            session.tokens.extend(feed)
            if len(feed) > 1:
                session.checkpoint()
        return list(logits)

    def _check_first(self, logits: torch.Tensor) -> None:
        """NaN/inf logits from a corrupt file are a model error, found on the first forward pass (once: a check
        every step would cost a device sync per token)."""
        if not self._finite_seen:
            if not bool(torch.isfinite(logits).all()):
                self._non_finite()
            self._finite_seen = True

    def _non_finite(self):
        raise MoecliError(f"model error: {self.path.name} computes NaN/inf logits (its weights or metadata are "
                          "corrupt)")

    def stream_text(self, tokens: Iterator[int], special: bool = False) -> Iterator[str]:
        """Text pieces for generated tokens, never splitting a UTF-8 character; control tokens only with `special`."""
        stream = TextStream(self.tokenizer, special)
        for t in tokens:
            piece = stream.push(t)
            if piece:
                yield piece
        tail = stream.flush()
        if tail:
            yield tail

    def _check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.config.n_vocab]
        if bad:
            raise MoecliError(f"token id {bad[0]} out of range [0, {self.config.n_vocab})")
        if not ids:
            raise MoecliError("empty prompt")


def _plan_context(ckpt, n_ctx: int | None, device: torch.device, engine: str):
    """Weights and KV cache checked against this host before anything is allocated (moecli.limits): the weights stay
    memory-mapped, so they must fit in RAM to run at speed; the torch engine keeps float32 copies of what it touches
    (on its device), the hybrid executor of the dense weights."""
    from moecli import limits

    c = ckpt.config
    on_cpu = device.type == "cpu"
    fp32_copies = engine == "torch" and on_cpu
    limits.check_weights(ckpt.file_bytes * (8 if fp32_copies else 1),
                         "the weights" + (" (and the torch engine's float32 copies)" if fp32_copies else ""))
    resident = ckpt.file_bytes * (8 if fp32_copies else 1)
    if not on_cpu:
        dense = sum(t.n_elements for name, t in ckpt.tensors.items() if engine == "torch" or "_exps" not in name)
        resident = dense * 4
    budget = limits.Budget.for_device(str(device), resident)
    return limits.fit_context(n_ctx, c.n_ctx_train, limits.kv_bytes_per_token(c), budget)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix: the tokens a KV cache can keep."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _check_device_memory(ckpt, path: Path, device: torch.device, placement: str, slots: int, n_ctx: int) -> None:
    from moecli.profile import plan as P

    free, total = torch.cuda.mem_get_info(device)
    P.check_fits(P.ModelFacts.from_checkpoint(ckpt, path.name), placement, slots, n_ctx, free, total, str(device))


def load(path: str | Path, device: str = "cpu", **options) -> Model:
    """Load a GGUF file or a Hugging Face safetensors directory.

    Options: n_ctx (context length), engine ("ggml": every weight matmul through llama.cpp's kernels on the
    quantized weights, the default on the CPU; "torch": the fp32 reference), threads (ggml threads),
    placement (a named placement, e.g. "hybrimoe", "lru", "ktransformers", "llama-cpp", "n-cpu-moe=N": routed
    experts split between the ggml CPU engine and an expert cache on `device`), expert_slots (cache slots per
    layer), costs (a policy.cost.CostModel; default: this host's profile for the model, `host_profile` a path or
    name to choose one, else defaults from the expert size; the executor refits it as it runs), flash_attn (ggml engine: prompts
    attend through ggml's flash attention, as llama.cpp's default; False: its non-flash path everywhere), exact
    (llama.cpp's own kernel choices, layouts and attention path: logits bit-identical to llama.cpp's CPU backend
    with an F32 KV cache and flash attention off, for every type; runtime/exact.py).
    """
    return Model(path, device=device, **options)
