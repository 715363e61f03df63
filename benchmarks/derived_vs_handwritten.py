"""Training-step speed of the derived Mixer-family blocks and models against their hand-written twins.

    .venv/bin/python benchmarks/derived_vs_handwritten.py [--rounds 10] [--threads N] [--only imixer] [--write-docs]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/derived_vs_handwritten.py --small --rounds 2   # smoke run

Each row is one forward + backward (loss = output.sum()) of a block built by ``derive.derived_block`` against the
hand-written block whose weights it carries (``derive.load_reference_block``), at Mixer-S/16 size: 196 tokens,
512 channels, batch 8, float32, CPU, train mode (the spectral-norm power iterations of the iMixers run on every
call), dropout and drop-path 0; and of whole models: ``derive.from_timm(timm mixer_s16_224)`` against the timm
model, ``derive.from_reference(imixer_s16_224)`` against the ``mixers`` model (224 x 224 images, batch 8).

Before timing, the outputs of the two twins on the same input must agree to 1e-5 relative (max abs difference over
max abs output); LayerNorm affines and classifier heads are randomised first, so that a check through a unit
LayerNorm or a zero-initialised head cannot pass vacuously. Timing: ``--warmup`` calls of each, then ``--rounds``
rounds of (hand-written, derived), interleaved so that drift hits both alike, grads set to None before every call
and outside the timed region. Reported: the median time of each, ratio = median(derived) / median(hand-written)
(target <= 1.05) and, as a check on it, the median of the per-round ratios.
Run it on an otherwise idle machine: two processes sharing the cores distort every number.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
from timm.models.mlp_mixer import MixerBlock as TimmMixerBlock  # noqa: E402
from timm.models.mlp_mixer import MlpMixer  # noqa: E402

import derive  # noqa: E402
import mixers  # noqa: E402  (registers imixer_s16_224 & co. with timm)
from experiments.runs import cpu_name  # noqa: E402

TARGET = 1.05  # derived / hand-written time
RTOL = 1e-5  # max |derived - hand-written| / max |hand-written|
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- begin: benchmarks/derived_vs_handwritten.py (generated; rerun with --write-docs to replace) -->"
END = "<!-- end: benchmarks/derived_vs_handwritten.py -->"


@dataclass
class Sizes:
    seq_len: int
    dim: int
    batch: int
    img_size: int
    patch_size: int
    num_blocks: int
    embed_dim: int

    @property
    def is_s16(self) -> bool:
        """The layout of Mixer-S/16 at 224 x 224 (what the timm names *_s16_224 build)."""
        return (self.img_size, self.patch_size, self.num_blocks, self.embed_dim) == (224, 16, 8, 512)

    def describe(self) -> str:
        return (f"blocks: {self.seq_len} tokens x {self.dim} channels, batch {self.batch}; models: "
                f"{self.img_size} x {self.img_size} images, patch {self.patch_size}, {self.num_blocks} blocks of "
                f"{self.embed_dim} channels, batch {self.batch}")


FULL = Sizes(seq_len=196, dim=512, batch=8, img_size=224, patch_size=16, num_blocks=8, embed_dim=512)
SMALL = Sizes(seq_len=16, dim=32, batch=2, img_size=32, patch_size=4, num_blocks=2, embed_dim=32)


@dataclass
class Case:
    key: str  # short name for --only
    name: str
    model: bool  # a whole model (timed with --model-rounds) rather than a block
    build: Callable[[Sizes], tuple[nn.Module, nn.Module, torch.Tensor]]  # -> (hand-written, derived, input)


@dataclass
class Result:
    name: str
    hand_ms: float
    derived_ms: float
    ratio: float
    round_ratio: float
    rel_diff: float
    model: bool
    times: dict = field(default_factory=dict)

    @property
    def agrees(self) -> bool:
        return self.rel_diff <= RTOL

    @property
    def passes(self) -> bool:
        return self.ratio <= TARGET


# ---------------------------------------------------------------------------------------------- the cases
@torch.no_grad()
def randomize_norms(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """LayerNorm affines away from (1, 0), so that the check covers where they are folded in."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
            if m.bias is not None:
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    return module


@torch.no_grad()
def randomize_head(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """timm's Mixer init zeroes the head, which would make every logit 0 whatever the blocks compute."""
    model.head.weight.copy_(0.02 * torch.randn(model.head.weight.shape, generator=gen))
    model.head.bias.copy_(0.02 * torch.randn(model.head.bias.shape, generator=gen))
    return model


def block_case(key: str, name: str, hand: Callable[[Sizes], nn.Module], kind: str, **kw) -> Case:
    def build(sz: Sizes):
        gen = torch.Generator().manual_seed(0)
        ref = randomize_norms(hand(sz), gen)
        der = derive.load_reference_block(derive.derived_block(kind, sz.seq_len, sz.dim, **kw), ref)
        x = torch.randn(sz.batch, sz.seq_len, sz.dim, generator=gen)
        return ref, der, x

    return Case(key, name, False, build)


def model_case(key: str, name: str, hand: Callable[[Sizes], nn.Module],
               convert: Callable[[nn.Module], nn.Module]) -> Case:
    def build(sz: Sizes):
        gen = torch.Generator().manual_seed(0)
        ref = randomize_head(randomize_norms(hand(sz), gen), gen)
        der = convert(ref)
        x = torch.randn(sz.batch, 3, sz.img_size, sz.img_size, generator=gen)
        return ref, der, x

    return Case(key, name, True, build)


def timm_mixer(sz: Sizes) -> nn.Module:
    """timm's mixer_s16_224 (10 classes); at other sizes timm's MlpMixer with the same layout."""
    if sz.is_s16:
        return timm.create_model("mixer_s16_224", num_classes=10)
    return MlpMixer(num_classes=10, img_size=sz.img_size, patch_size=sz.patch_size, num_blocks=sz.num_blocks,
                    embed_dim=sz.embed_dim)


def mixers_imixer(sz: Sizes) -> nn.Module:
    """The mixers package's imixer_s16_224 (10 classes, h_ratio 2), sizes overridden by ``sz``."""
    size_kw = {} if sz.is_s16 else dict(img_size=sz.img_size, patch_size=sz.patch_size, num_blocks=sz.num_blocks,
                                        embed_dim=sz.embed_dim)
    return timm.create_model("imixer_s16_224", num_classes=10, h_ratio=2, **size_kw)


CASES = [
    block_case("mixer-mixers", "Mixer vs mixers.MixerBlock", lambda s: mixers.MixerBlock(s.dim, s.seq_len), "mixer"),
    block_case("mixer-timm", "Mixer vs timm MixerBlock", lambda s: TimmMixerBlock(s.dim, s.seq_len), "mixer"),
    block_case("imixer", "iMixer (h_ratio 2, n_iter 2)",
               lambda s: mixers.IMixerBlock(s.dim, s.seq_len, h_ratio=2, n_iter=2),
               "imixer", h_ratio=2, n_iter=2),
    *[block_case(f"limixer{L}", f"L-layer iMixer L={L} (h_ratio 2, n_iter 2)",
                 lambda s, L=L: mixers.LiMixerBlock(s.dim, s.seq_len, depth=L, h_ratio=2, n_iter=2),
                 "limixer", depth=L, h_ratio=2, n_iter=2) for L in (4, 5)],
    *[block_case(f"paramixer-{form}", f"parallelized Mixer {form} (norm matrix)",
                 lambda s, form=form: mixers.ParaMixerBlock(s.dim, s.seq_len, form=form, norm="matrix"),
                 "paramixer", form=form, norm="matrix") for form in ("symmetric", "untied", "broken")],
    model_case("model-mixer", "model: Mixer-S/16 vs timm mixer_s16_224", timm_mixer, derive.from_timm),
    model_case("model-imixer", "model: iMixer-S/16 (h_ratio 2) vs mixers imixer_s16_224", mixers_imixer,
               derive.from_reference),
]


# ---------------------------------------------------------------------------------------------- measuring
def rel_diff(ref: nn.Module, der: nn.Module, x: torch.Tensor) -> float:
    """max |derived - hand-written| / max |hand-written| on one train-mode forward (power iterations included)."""
    with torch.no_grad():
        a, b = der(x), ref(x)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        module(x).sum().backward()

    return run


def interleaved(fns: dict[str, tuple[nn.Module, Callable[[], None]]], rounds: int, warmup: int) -> dict[str, list]:
    """Per-call wall times, the variants called in turn every round; grads are dropped before each call, untimed."""
    for _ in range(warmup):
        for module, fn in fns.values():
            module.zero_grad(set_to_none=True)
            fn()
    times: dict[str, list] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, (module, fn) in fns.items():
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    for module, _ in fns.values():
        module.zero_grad(set_to_none=True)
    return times


def measure(case: Case, sz: Sizes, rounds: int, warmup: int) -> Result:
    torch.manual_seed(0)
    ref, der, x = case.build(sz)
    for m in (ref, der):
        m.train()
    diff = rel_diff(ref, der, x)
    print(f"{case.name}: max rel diff {diff:.2e}{'' if diff <= RTOL else f'  > {RTOL:g}: OUTPUTS DIFFER'}",
          flush=True)
    t = interleaved({"hand": (ref, step(ref, x)), "derived": (der, step(der, x))}, rounds, warmup)
    h, d = statistics.median(t["hand"]), statistics.median(t["derived"])
    per_round = statistics.median(b / a for a, b in zip(t["hand"], t["derived"]))
    res = Result(case.name, 1e3 * h, 1e3 * d, d / h, per_round, diff, case.model, t)
    print(f"  hand-written {res.hand_ms:.2f} ms, derived {res.derived_ms:.2f} ms, ratio {res.ratio:.3f} "
          f"(median of per-round ratios {res.round_ratio:.3f})", flush=True)
    return res


# ---------------------------------------------------------------------------------------------- reporting
def machine() -> str:
    return (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), timm {timm.__version__}")


def table(results: list[Result]) -> list[str]:
    """The docs' table: ratios only (CPU times are not comparable across machines; the terminal shows them)."""
    lines = ["| block | ratio derived / hand-written | median per-round ratio "
             f"| max rel diff | pass (ratio <= {TARGET}) |",
             "|---|---|---|---|---|"]
    for r in results:
        diff = f"{r.rel_diff:.1e}" + ("" if r.agrees else " (DIFFER)")
        lines.append(f"| {r.name} | {r.ratio:.3f} | {r.round_ratio:.3f} "
                     f"| {diff} | {'yes' if r.passes else 'no'} |")
    return lines


def render(results: list[Result], args, sz: Sizes, command: str) -> str:
    rounds = ", ".join(f"{n} per {what}" for what, n in (("block", args.rounds), ("model", args.model_rounds))
                       if any(r.model == (what == "model") for r in results))
    lines = [
        f"## Derived vs hand-written blocks and models, forward + backward ({datetime.date.today().isoformat()})",
        "",
        f"Command: `{command}`; machine: {machine()}; float32, CPU, train mode, dropout and drop-path 0; "
        f"{sz.describe()}; {args.warmup} warm-up calls of each, then interleaved rounds: {rounds}.",
        "",
        *table(results),
        "",
        f"{sum(r.passes for r in results)} of {len(results)} rows within the target ratio {TARGET}; outputs agree "
        f"to {RTOL:g} in {sum(r.agrees for r in results)} of {len(results)}.",
        "",
        "(ratio = median derived time / median hand-written time; below 1 means the derived block is faster. "
        f"Max rel diff = max |derived - hand-written| / max |hand-written| of the outputs on the same input, "
        f"required <= {RTOL:g}, with randomised LayerNorm affines and heads.)",
    ]
    return "\n".join(lines) + "\n"


def write_docs(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the section of ``path`` marked ``begin`` ... ``end`` (by default this script's), or append it; the
    rest of the file is left as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{section}{end}\n"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].removeprefix("\n")
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv=None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds per block (default 10)")
    p.add_argument("--model-rounds", type=int, default=5, help="interleaved timing rounds per model (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each variant first (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: $OMP_NUM_THREADS if set, else all cores)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; 2 with --small)")
    p.add_argument("--only", action="append", default=None, metavar="TEXT",
                   help="run only the rows whose key or name contains TEXT (case-insensitive; repeatable; see --list)")
    p.add_argument("--small", action="store_true",
                   help="tiny sizes for a smoke run: 16 tokens x 32 channels; 32 x 32 images, patch 4, 2 blocks")
    p.add_argument("--list", action="store_true", help="list the rows (key, name) and exit")
    p.add_argument("--write-docs", nargs="?", const=str(DOCS), default=None, metavar="PATH",
                   help="write (or replace) this script's section of docs/benchmarks.md (or of PATH)")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(f"{c.key:20s} {c.name}" for c in CASES))
        return []
    if args.small and args.write_docs is not None and Path(args.write_docs).resolve() == DOCS.resolve():
        p.error("--write-docs records the Mixer-S/16-size run; drop --small (or give a PATH other than the docs)")
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = args.threads or (int(omp) if omp.isdigit() else 0) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    sz = SMALL if args.small else FULL
    if args.batch is not None:
        sz = Sizes(**{**sz.__dict__, "batch": args.batch})
    cases = [c for c in CASES if not args.only or any(s.lower() in f"{c.key} {c.name}".lower() for s in args.only)]
    if not cases:
        p.error(f"--only {args.only} matches none of: " + "; ".join(f"{c.key} ({c.name})" for c in CASES))
    print(f"{machine()}; {sz.describe()}", flush=True)
    results = [measure(c, sz, args.model_rounds if c.model else args.rounds, args.warmup) for c in cases]
    env = [f"OMP_NUM_THREADS={omp}"] if omp and args.threads is None else []
    command = shlex.join([*env, ".venv/bin/python", "benchmarks/derived_vs_handwritten.py",
                          *(sys.argv[1:] if argv is None else argv)])
    section = render(results, args, sz, command)
    print()
    print(section)
    if args.write_docs is not None:
        write_docs(Path(args.write_docs), section)
        print(f"wrote {args.write_docs}")
    if not all(r.agrees for r in results):
        print(f"some outputs differ by more than {RTOL:g}: " + ", ".join(r.name for r in results if not r.agrees))
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
