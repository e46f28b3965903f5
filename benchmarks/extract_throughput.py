"""How fast extraction runs against its floor and its peer, what it costs in memory and disk, and what alignment costs.

    OMP_NUM_THREADS=1 python -m benchmarks.extract_throughput --json perf.json          # full run, ~15 min
    OMP_NUM_THREADS=1 python -m benchmarks.extract_throughput --quick                   # < 3 min on 2 cores

One process, the same batches for every measurement (see benchmarks/ladder.py for the rungs A, B, F, P).
SAEs are random JumpReLU SAEs at Gemma Scope's width with thresholds calibrated to a realistic L0:
Gemma Scope's releases cannot be downloaded here, and random ReLU SAEs would be ~100x too dense.
Run it on an idle machine; it prints one table and writes every number to --json.
"""

from __future__ import annotations

from toolkit.output import quiet_libraries

quiet_libraries()  # before torch and the libraries load (tqdm reads its settings on import): one display

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.ladder import calibration_batches, jumprelu_saes, plan, run_ladder, scratch_dir  # noqa: E402
from toolkit import corpus as corpora  # noqa: E402
from toolkit import models  # noqa: E402
from toolkit.config import Config, parse_layers  # noqa: E402
from toolkit.store import ActivationFile  # noqa: E402

SHARED = Path(os.environ.get("TOOLKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# sae-lens packs the texts into rows of this many tokens (the context of every published peer figure); the
# extraction default max_length (512) would leave a --quick corpus without a single full row.
PEER_CONTEXT = 128
TARGETS = {"capture_over_forward": (">=", 0.9), "pipeline_over_floor": (">=", 0.8),
           "pipeline_over_saelens": (">=", 10.0), "rss_ratio_16x": ("<=", 1.1), "align_step_ratio": ("<=", 1.5)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ntrex = SHARED / "ntrex128"
    p = argparse.ArgumentParser(prog="python -m benchmarks.extract_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small corpus and sizes: a smoke run in under 3 minutes")
    p.add_argument("--preset", default="embedded", choices=("embedded", "tiny"),
                   help="the model measured (tiny: a smoke run of every measurement in seconds)")
    p.add_argument("--json", metavar="FILE", help="write every measurement here")
    p.add_argument("--corpus", default=f"ntrex:{ntrex}" if ntrex.is_dir() else "embedded",
                   help="corpus spec (default: NTREX-128 from the shared data, else the embedded corpus)")
    p.add_argument("--langs", default="hi", help="languages (English is always added, as in the pipeline)")
    p.add_argument("--sentences", type=int, help="sentences per language (default 48; 4 with --quick)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per rung, after one warm-up")
    p.add_argument("--sae-width", type=int, default=16384, help="SAE features per layer (Gemma Scope: 16k)")
    p.add_argument("--l0", type=int, default=64, help="active features per token the random SAEs are calibrated to")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype of model, SAEs and peer (auto: float32 on CPU, as the pipeline)")
    p.add_argument("--peer-every-layer", action="store_true",
                   help="also run the peer once per layer (18 runs, ~2 min) instead of only extrapolating")
    p.add_argument("--skip", default="", help="comma list of parts to leave out: tiny, peer, memory, align")
    args = p.parse_args(argv)
    args.sentences = args.sentences or (4 if args.quick else 48)
    args.skip = set(filter(None, args.skip.split(",")))
    return args


def build(preset: str, args: argparse.Namespace, run: Path, width: int, l0: int):
    cfg = Config.build({"run": {"run": str(run), "langs": args.langs, "corpus": args.corpus,
                                "max_sentences": args.sentences}, "model": {"dtype": args.dtype}}, preset=preset)
    corpus = corpora.load(cfg.run.corpus, cfg.lang_codes, cfg.run.max_sentences)
    lm = models.load(cfg.model)
    layers = parse_layers(cfg.run.layers, lm.n_layers)
    calibration = calibration_batches(plan(cfg, lm, corpus))
    saes = jumprelu_saes(lm, layers, width, l0, calibration, cfg.run.seed)
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, source=saes.source))
    return cfg, lm, corpus, layers, saes


def disk_usage(files: list[str]) -> dict:
    """Bytes per token per layer of the finished files, against the nonzero codes' own bytes."""
    size = tokens_layers = nnz_bytes = 0
    for path in files:
        size += Path(path).stat().st_size
        with ActivationFile(path) as f:
            tokens_layers += int(f.attrs["n_tokens"]) * len(f.layers)
            nnz_bytes += sum(f.code_bytes(layer) for layer in f.layers)
    return {"bytes_per_token": size / tokens_layers, "code_bytes_per_token": nnz_bytes / tokens_layers,
            "file_over_codes": size / max(nnz_bytes, 1)}


# Runs `python -m toolkit.submit ARGS` and writes the process's own peak RSS (VmHWM) to FILE when it exits.
# Not wait4()'s ru_maxrss: Linux carries the parent's peak across fork and exec, and ours holds the model.
RSS_CHILD = """import atexit, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))))
sys.argv[0] = "toolkit.submit"
runpy.run_module("toolkit.submit", run_name="__main__", alter_sys=True)
"""


def peak_rss(args: argparse.Namespace, sae_dir: Path, work: Path, scales: tuple[int, ...], batch_tokens: int) -> dict:
    """Peak RSS of `toolkit.submit extract` run as users run it, at growing corpus sizes, same batch size.

    Each child reports its own peak, so with --quick (small corpora) they run two at a time: their start-up
    (imports, model load) is most of their time. The full run keeps one at a time, for memory's sake."""
    out = {}
    parallel = 2 if args.quick else 1
    for start in range(0, len(scales), parallel):
        children = {}
        for scale in scales[start:start + parallel]:
            cmd = [sys.executable, "-c", RSS_CHILD, str(work / f"rss{scale}.txt"), "extract", "--preset",
                   args.preset, "--sae", f"dir:{sae_dir}", "--corpus", args.corpus, "--langs", args.langs,
                   "--max-sentences", str(args.sentences * scale), "--dtype", args.dtype, "--batch-tokens",
                   str(batch_tokens), "--run", str(work / f"rss{scale}")]
            children[scale] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for scale, child in children.items():
            _, err = child.communicate()
            if child.returncode:
                raise RuntimeError(f"extract at {scale}x the corpus failed:\n{err[-2000:]}")
            out[scale] = int((work / f"rss{scale}.txt").read_text().split()[1]) * 1024  # VmHWM is in kB
    return out


def memory_result(rss: dict[int, int]) -> dict:
    """The peak RSS per corpus scale and its growth over 1x (the target is on 16x)."""
    out: dict = {"rss_bytes": {str(k): v for k, v in rss.items()}}
    for scale in (4, 16):
        if scale in rss:
            out[f"rss_ratio_{scale}x"] = rss[scale] / rss[1]
    return out


def machine() -> dict:
    return {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console = Console(stderr=True)
    command = " ".join(["python -m benchmarks.extract_throughput", *(argv or sys.argv[1:])])
    result: dict = {**machine(), "command": command, "sae_width": args.sae_width, "sae_l0": args.l0,
                    "corpus": args.corpus, "langs": args.langs, "sentences_per_language": args.sentences,
                    "repeats": args.repeats, "dtype": args.dtype}
    with scratch_dir() as tmp:
        work = Path(tmp)
        console.print(f"[bold]{args.preset} model:[/] ladder A/B/F/P")
        cfg, lm, corpus, layers, saes = build(args.preset, args, work / args.preset, args.sae_width, args.l0)
        model_dir = models.embedded_dir() if args.preset == "embedded" else models.tiny_dir()
        ladder = run_ladder(cfg, lm, saes, corpus, layers, args.repeats, work / args.preset)
        result.update({k: v for k, v in ladder.items() if k != "files"}, layers=len(layers))
        result.update(disk_usage(ladder["files"]))
        if "peer" not in args.skip:
            console.print("[bold]peer:[/] sae-lens cache runner, one hook")
            from benchmarks.saelens_peer import saelens_cache_tps

            texts = [t for lang in corpus.langs for _, t in corpus.sentences(lang)]
            dtype = str(lm.dtype).removeprefix("torch.")
            peer = saelens_cache_tps(model_dir, texts, layer=lm.n_layers // 2, n_layers=lm.n_layers,
                                     context_size=PEER_CONTEXT, work_dir=work / "saelens", dtype=dtype)
            per_run = peer["tokens"] / (peer["init_seconds"] + peer["seconds"]) / lm.n_layers
            result.update(saelens=peer, saelens_all_layers_tps=peer["all_layers_tps"],
                          pipeline_over_saelens=result["pipeline_tps"] / peer["all_layers_tps"],
                          saelens_with_model_load_all_layers_tps=per_run,
                          capture_over_saelens=result["capture_tps"] / peer["all_layers_tps"])
            if args.peer_every_layer:
                from benchmarks.saelens_peer import saelens_every_layer

                every = saelens_every_layer(model_dir, texts, lm.n_layers, PEER_CONTEXT,
                                            work / "saelens", dtype=dtype)
                result.update(saelens_every_layer=every, saelens_measured_all_layers_tps=every["all_layers_tps"],
                              saelens_one_pass_ceiling=every["one_pass_ceiling"],
                              pipeline_over_saelens_measured=result["pipeline_tps"] / every["all_layers_tps"])
        if "align" not in args.skip:
            console.print("[bold]alignment:[/] alignment step vs plain LoRA LM step")
            from benchmarks.align_step import align_step_ratio

            result["align"] = align_step_ratio(cfg, lm, saes, corpus, target=cfg.lang_codes[-1], repeats=args.repeats)
            result["align_step_ratio"] = result["align"]["align_step_ratio"]
        sae_dir = work / "saes"  # for the memory runs, which come last: they are not timed
        for layer, s in saes.layers.items():
            s.sae.save_model(sae_dir / f"layer_{layer}")
        del lm, saes
        if "tiny" not in args.skip and args.preset != "tiny":
            console.print("[bold]tiny model:[/] ladder A/B/F/P")
            tiny = build("tiny", args, work / "tiny", width=512, l0=16)
            result["tiny"] = {k: v for k, v in run_ladder(*tiny[:2], tiny[4], tiny[2], tiny[3], args.repeats,
                                                           work / "tiny").items() if k != "files"}
        if "memory" not in args.skip:
            scales = (1, 16) if args.quick else (1, 4, 16)  # quick: the ratio the target is set on, one run less
            console.print(f"[bold]memory:[/] peak RSS of the extract command at {', '.join(f'{k}x' for k in scales)} "
                          "the corpus")
            rss = peak_rss(args, sae_dir, work, scales, batch_tokens=256 if args.quick else 1024)
            result.update(memory_result(rss))
    print_table(result, Console())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def print_table(r: dict, console: Console) -> None:
    table = Table(title=f"lingogap extraction benchmark, {r['date']}, {r['threads']} thread(s), torch {r['torch']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    rows = [("A forward, tokens/s", "forward_tps"), ("B + capture all layers, tokens/s", "capture_tps"),
            ("F SAE encode all layers, tokens/s", "encode_tps"),
            ("F+C encode + controls (resid_norm, recon_err), tokens/s", "encode_controls_tps"),
            ("controls' cost over encode", "controls_cost_over_encode"), ("P full pipeline, tokens/s", "pipeline_tps"),
            ("floor 1/(1/A+1/F), tokens/s", "floor_tps"), ("B/A", "capture_over_forward"),
            ("P/floor", "pipeline_over_floor"),
            ("sae-lens cache runner, 1 layer per run, all layers, tokens/s", "saelens_all_layers_tps"),
            ("  the same with its model load per run, tokens/s", "saelens_with_model_load_all_layers_tps"),
            ("  the same measured, one run per layer, tokens/s", "saelens_measured_all_layers_tps"),
            ("P/sae-lens", "pipeline_over_saelens"), ("B/sae-lens (capture alone)", "capture_over_saelens"),
            ("P/sae-lens measured per layer", "pipeline_over_saelens_measured"),
            ("sae-lens: all runs / its deepest run (one-pass ceiling)", "saelens_one_pass_ceiling"),
            ("peak RSS 16x / 1x corpus", "rss_ratio_16x"),
            ("HDF5 bytes per token per layer", "bytes_per_token"),
            ("nonzero codes' bytes per token per layer", "code_bytes_per_token"),
            ("alignment step / LoRA LM step", "align_step_ratio")]
    for label, key in rows:
        if key in r:
            op, bound = TARGETS.get(key, ("", None))
            met = "" if bound is None else ("ok" if (r[key] >= bound if op == ">=" else r[key] <= bound) else "MISSED")
            table.add_row(label, f"{r[key]:,.2f}" if r[key] < 100 else f"{r[key]:,.0f}",
                          "" if bound is None else f"{op} {bound} {met}")
    if "tiny" in r:
        t = r["tiny"]
        rungs = " / ".join(f"{t[k]:,.0f}" for k in ("forward_tps", "capture_tps", "encode_tps", "pipeline_tps"))
        table.add_row("tiny model: A / B / F / P tokens/s", rungs, "")
    console.print(table)


if __name__ == "__main__":
    main()
