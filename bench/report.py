"""The report of a run: the targets table (each row of bench/targets.py, measured and met or
not), the sections' tables, and the plot; from the results dict `python -m bench` writes, or
from a results JSON (`python -m bench --render FILE`)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.targets import TARGETS


def threshold(name: str, spec: str = "g") -> str:
    """A target's threshold as the report writes it (`spec`: a format spec, e.g. ",.0f")."""
    return format(TARGETS[name].threshold, spec)


def met(name: str, value: float) -> bool:
    return TARGETS[name].met(value)


def yes(ok: bool) -> str:
    return "yes" if ok else "no"


def training_rows(tr: dict) -> list[tuple[str, str, str, str]]:
    runs = tr.get("runs", [tr])  # results written before the spread was measured hold one run
    speedups = [run["speedup"] for run in runs]
    spread = (f"{min(speedups):.2f}x to {max(speedups):.2f}x over {len(runs)} runs, median "
              f"{statistics.median(speedups):.2f}x" if len(runs) > 1 else f"{speedups[0]:.2f}x (1 run)")
    acc_seed, acc_fast = tr["seed_loop"]["test_accuracy_after_1_epoch"], tr["fast_path"]["test_accuracy_after_1_epoch"]
    why = ("the seed loop builds, converts and normalizes a PIL image per item on every step; the fast path "
           "(channels-last, data decoded once) is left with oneDNN's kernels: see the step's parts below")
    if "speedup_ceiling" in tr:  # measured since the one-thread run was added
        why += (f"; on 1 thread the fast path runs {tr['fast_path_one_thread']['images_per_second']:,.0f} img/s, and "
                f"{tr['threads']} x that would be {tr['speedup_ceiling']:.2f}x the seed loop (median)")
    return [
        (f"training fast path >= {threshold('training speedup')}x the seed loop's img/s in every run (batch 64, CPU)",
         f"{spread} ({tr['fast_path']['images_per_second']:,.0f} vs {tr['seed_loop']['images_per_second']:,.0f} "
         f"img/s, medians, {tr['threads']} threads)", yes(met('training speedup', min(speedups))), why),
        ("... with the same test accuracy (after 1 epoch)", f"{100 * acc_fast:.2f}% vs {100 * acc_seed:.2f}%",
         yes(met("training accuracy gap", abs(acc_fast - acc_seed))), "same recipe; the epoch orders differ"),
    ]


def recipe_rows(rc: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    best_name, best = max(rc["recipes"].items(), key=lambda item: item[1]["best_test_accuracy"])
    rows.append((f"a recipe reaches >= {threshold('recipe accuracy', '.1%')} Fashion-MNIST test accuracy on this CPU",
                 f"--recipe {best_name}: best {100 * best['best_test_accuracy']:.2f}% ({best['epochs']} epochs, "
                 f"{best['wall_seconds']:.0f} s)", yes(met("recipe accuracy", best["best_test_accuracy"])), "the same network"))
    for name, recipe in rc["recipes"].items():
        reached = ", ".join(
            f"{100 * t:.0f}%: " + (f"{recipe['reached'][str(t)]['training_seconds']:.0f} s (epoch "
                                   f"{recipe['reached'][str(t)]['epoch']})" if str(t) in recipe["reached"] else "not reached")
            for t in rc["targets"])
        rows.append((f"time to accuracy, --recipe {name} ({rc['threads']} threads)",
                     f"{reached}; best {100 * recipe['best_test_accuracy']:.2f}% after {recipe['epochs']} epochs",
                     "-", "training seconds, evaluation excluded"))
    return rows


def serving_rows(r: dict) -> list[tuple[str, str, str, str]]:
    sv, rows = r["serving"], []
    c = 32 if 32 in sv["ceiling"] else max(sv["ceiling"])
    ceiling = sv["ceiling"][c]["requests_per_second"]
    if "shipped" in sv:
        shipped = sv["shipped"]
        v = shipped["by_concurrency"][c]
        ok = (met("shipped req/s", v["requests_per_second"]) and met("shipped p99", v["p99_ms"])
              and met("shipped non-2xx", v["non_2xx"]))
        rows.append((f"TorchServe as shipped >= {threshold('shipped req/s', ',.0f')} req/s at concurrency {c}, "
                     f"p99 <= {threshold('shipped p99')} ms, PNG bodies, {threshold('shipped non-2xx')} non-2xx",
                     f"{v['requests_per_second']:,.0f} req/s, p99 {v['p99_ms']:.1f} ms, non-2xx {v['non_2xx']}",
                     yes(ok), f"{shipped['workers']} workers (one per core here), batches of up to "
                     f"{shipped['batch_size']} within {shipped['max_delay_ms']} ms; "
                     f"{100 * v['requests_per_second'] / ceiling:.0f}% of the loopback ceiling ({ceiling:,.0f} req/s)"))
        peers = {name: row for name, row in sv.get("peers", {}).items()}
        from bench.peers import best_peer
        best = best_peer(peers)
        if best:
            name, row = best
            ours = shipped["json_body"]["requests_per_second"]
            rows.append((f"... >= {threshold('best peer')}x the best peer, same JSON bodies at concurrency {c}",
                         f"{ours / row['requests_per_second']:.1f}x ({ours:,.0f} vs {row['requests_per_second']:,.0f} "
                         f"req/s, {name})", yes(met("best peer", ours / row["requests_per_second"])),
                         "peers serve model.onnx with onnxruntime and the project's preprocessing"))
        elif "peers" in sv:
            rows.append((f"... >= {threshold('best peer')}x the best peer", "no peer was measured", "no", "see the peers table"))
    configs = sv["configs"]
    unbatched = {cfg["workers"]: cfg["by_concurrency"][c] for cfg in configs.values() if cfg["batch_size"] == 1}
    batched = [(cfg["workers"], cfg["by_concurrency"][c]) for cfg in configs.values() if cfg["batch_size"] > 1]
    if unbatched and batched:
        workers, on = max(batched, key=lambda item: item[1]["requests_per_second"])
        off_workers = workers if workers in unbatched else min(unbatched)
        off = unbatched[off_workers]
        rows.append((f"batching >= {threshold('batching')}x TorchServe's own unbatched figure",
                     f"{on['requests_per_second'] / off['requests_per_second']:.1f}x ({on['requests_per_second']:,.0f} "
                     f"req/s batched with {workers} worker(s) vs {off['requests_per_second']:,.0f} unbatched with "
                     f"{off_workers})", yes(met("batching", on["requests_per_second"] / off["requests_per_second"])), ""))
    rows.append(("start-up: torchserve --start to every worker READY",
                 f"median {statistics.median(sv['startup_seconds']):.1f} s", "-", "no target"))
    if sv["device"] != "cpu":
        cmax = max(sv["ceiling"])
        best_name, best = max(((n, cfg["by_concurrency"][cmax]) for n, cfg in configs.items()),
                              key=lambda item: item[1]["requests_per_second"])
        ok = (met("GPU req/s", best["requests_per_second"]) and met("GPU p99", best["p99_ms"])
              and met("GPU non-2xx", best["non_2xx"]))
        rows.append((f"GPU ({sv['device']}): >= {threshold('GPU req/s', ',.0f')} req/s at concurrency {cmax}, "
                     f"p99 <= {threshold('GPU p99')} ms, no errors",
                     f"{best['requests_per_second']:,.0f} req/s, p99 {best['p99_ms']:.1f} ms ({best_name})",
                     yes(ok), f"frontend threads {sv['frontend_threads']}"))
    return rows


def targets(r: dict) -> list[tuple[str, str, str, str]]:
    """(target, measured, met, note) rows."""
    rows = []
    if "training" in r:
        rows += training_rows(r["training"])
    if "recipes" in r and "recipes" in r["recipes"]:
        rows += recipe_rows(r["recipes"])
    if "inference" in r:
        b1 = r["inference"]["batch1"]
        ratio = b1["eager"] / b1["onnxruntime"]
        rows.append((f"onnxruntime batch 1 <= {threshold('onnxruntime batch 1')} us per image and >= "
                     f"{threshold('onnxruntime vs eager')}x eager PyTorch (1 thread)",
                     f"{b1['onnxruntime']:.1f} us; {ratio:.1f}x eager ({b1['eager']:.1f} us)",
                     yes(met("onnxruntime batch 1", b1["onnxruntime"]) and met("onnxruntime vs eager", ratio)),
                     "per-call overhead dominates at batch 1"))
    if "framing" in r:
        forms = r["framing"]["forms"]
        worst = max((row["points_below_dataset_form"], form) for form, row in forms.items() if form != "dataset")
        rows.append((f"each real-world form (paper, canvas, phone) within {threshold('real-world forms')} points of "
                     "the data set's form",
                     f"worst: {worst[1]}, {worst[0]:.1f} points below ({r['framing']['images']} images per form)",
                     yes(met("real-world forms", worst[0])), "framing auto; onnxruntime on the same preprocessing as every runtime"))
    if "serving" in r:
        rows += serving_rows(r)
    if "serving" not in r or r["serving"]["device"] == "cpu":
        rows.append((f"GPU: >= {threshold('GPU req/s', ',.0f')} req/s at concurrency {threshold('GPU concurrency')} "
                     f"(p99 <= {threshold('GPU p99')} ms); {threshold('recipe accuracy', '.1%')} in <= "
                     f"{threshold('GPU time to accuracy')} s of training",
                     "not measured by this run", "-", "no GPU here"))
    return rows


def write_markdown(r: dict, path: Path) -> None:
    lines = [f"# Benchmark, {r['host']}, {r['date']}", "",
             f"{r['cpu']}, {r['cores']} cores, torch {r['torch']}, onnxruntime {r['onnxruntime']}. "
             "Medians; every comparison within this one run.", "",
             "## Targets", "", "| target | measured | met | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets(r)]
    if "step_breakdown" in r.get("training", {}):
        sb = r["training"]["step_breakdown"]
        step = sb["microseconds"]["step"]
        lines += ["", f"## A fast-path training step, part by part (CPU, {sb['threads']} thread(s), batch 64, "
                  f"median of {sb['steps']} steps)", "", "| part | us | share |", "| --- | --- | --- |"]
        lines += [f"| {part} | {us:,.0f} | {100 * us / step:.0f}% |" for part, us in sb["microseconds"].items()]
        lines += ["", "Timed with the wall clock and gradient hooks (bench/step_breakdown.py), not the "
                  "profiler, whose per-op attribution misled here. The parts add up to the step but for "
                  "zero_grad and registering the hooks."]
    if "inference" in r:
        inf = r["inference"]
        lines += ["", "## In-process inference (CPU, 1 thread, us per image, median)", "",
                  "| batch | eager | TorchScript | onnxruntime |", "| --- | --- | --- | --- |"]
        for batch in ("batch1", "batch64"):
            v = inf[batch]
            lines.append(f"| {batch[5:]} | {v['eager']:.1f} | {v['torchscript']:.1f} | {v['onnxruntime']:.1f} |")
    if "serving" in r:
        sv = r["serving"]
        lines += ["", f"## REST (wrk, {sv['duration_seconds']} s per point, POST of a 28x28 PNG with the token)", "",
                  "| server | concurrency | req/s | p50 ms | p99 ms | non-2xx | % of ceiling |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        rows = list(sv["configs"].items())
        if "shipped" in sv:
            shipped = sv["shipped"]
            rows.insert(0, (f"as shipped ({shipped['workers']} workers, batching on ({shipped['batch_size']}))", shipped))
        for name, cfg in rows:
            for c, v in cfg["by_concurrency"].items():
                share = 100 * v["requests_per_second"] / sv["ceiling"][c]["requests_per_second"]
                lines.append(f"| TorchServe, {name} | {c} | {v['requests_per_second']:,.0f} | {v['p50_ms']:.2f} | "
                             f"{v['p99_ms']:.2f} | {v['non_2xx']} | {share:.0f}% |")
        for c, v in sv["ceiling"].items():
            lines.append(f"| loopback ceiling (asyncio, fixed answer) | {c} | {v['requests_per_second']:,.0f} | "
                         f"{v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['non_2xx']} | 100% |")
        lines += ["", f"Batching on: maxBatchDelay 5 ms. Each worker: 1 torch thread. Frontend (netty) threads: "
                  f"{sv['frontend_threads']}. Device: {sv['device']}. "
                  "TorchServe's own overhead is the gap between its unbatched figure and the ceiling: "
                  "the Java frontend's HTTP handling and the frontend-to-worker socket hop per batch."]
        if "peers" in sv:
            lines += peers_table(sv)
    if "formats" in r:
        lines += formats_markdown(r["formats"])
    if "protocols" in r:
        from bench.protocols import markdown as protocols_markdown
        lines += protocols_markdown(r["protocols"])
    if "framing" in r:
        from bench.realistic_inputs import markdown_table
        lines += ["", "## Real-world inputs: accuracy per form (bench/realistic_inputs.py)", "",
                  markdown_table(r["framing"])]
        if "per_form" in r["framing"]:
            from bench.forms import markdown_table as forms_table
            lines += ["", "## Every form that applies: accuracy (bench/forms.py)", "", forms_table(r["framing"]["per_form"])]
    path.write_text("\n".join(lines) + "\n")


def formats_markdown(fr: dict) -> list[str]:
    lines = ["", f"## Formats (CPU, 1 thread; REST: wrk, concurrency {fr['concurrency']}, "
             f"{fr['duration_seconds']} s, the shipped model-config.yaml: one worker per core, batches of up to 16)", "",
             "| format | us/image batch 1 | us/image batch 64 | REST req/s | p99 ms | non-2xx | "
             "start-up to READY s | archive KiB | model file KiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for fmt, v in fr["formats"].items():
        startup = f"{v['startup_seconds']:.1f}"
        if "startup_seconds_warm_cache" in v:
            startup += f" (warm inductor cache: {v['startup_seconds_warm_cache']:.1f})"
        lines.append(f"| {fmt} | {v['us_per_image_batch1']:.1f} | {v['us_per_image_batch64']:.1f} | "
                     f"{v['rest']['requests_per_second']:,.0f} | {v['rest']['p99_ms']:.1f} | {v['rest']['non_2xx']} | "
                     f"{startup} | {v['archive_bytes'] / 1024:.0f} | {v['file_bytes'] / 1024:.0f} |")
    lines += ["", "TorchScript runs frozen and oneDNN-fused, as the handler serves it on the CPU; pt2 is "
              "compiled for this host's CPU; onnx is the edge's model.onnx in onnxruntime. Each server "
              "starts with an empty inductor cache (pt2: then a second start with it warm)."]
    return lines


def peers_table(sv: dict) -> list[str]:
    shipped = sv["shipped"]
    ours = shipped["json_body"]
    lines = ["", f"## Peers (wrk, {sv['duration_seconds']} s, concurrency {ours['concurrency']}, the same JSON body "
             "{\"image\": \"<base64 PNG>\"}, same model, same preprocessing)", "",
             "| server | req/s | p50 ms | p99 ms | non-2xx | start-up s | project / peer |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| TorchServe as shipped ({shipped['workers']} workers, batching on ({shipped['batch_size']})) | "
             f"{ours['requests_per_second']:,.0f} | {ours['p50_ms']:.2f} | {ours['p99_ms']:.2f} | {ours['non_2xx']} | "
             f"{sv['startup_seconds'][0]:.1f} | 1.0x |"]
    for name, row in sv["peers"].items():
        if "requests_per_second" not in row:
            lines.append(f"| {name} | not measured: {row['error'][:200]} | | | | | |")
            continue
        lines.append(f"| {name} | {row['requests_per_second']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                     f"{row['non_2xx']} | {row['startup_seconds']:.1f} | "
                     f"{ours['requests_per_second'] / row['requests_per_second']:.1f}x |")
    lines += ["", "Every peer serves build/model.onnx with onnxruntime (1 thread per worker) and contract/'s "
              "preprocessing, and must answer a real test image within 1e-5 of onnxruntime before it is measured "
              "(all did: max |dp| " + ", ".join(f"{row['max_abs_dp']:.1e}" for row in sv["peers"].values()
                                                   if "max_abs_dp" in row) + "). "
              "BentoML's batchable API takes a list per request, so its body is {\"image\": [\"<base64 PNG>\"]}."]
    return lines


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if "training" in r:
        tr = r["training"]
        axes[0].bar(["seed loop", "fast path"], [tr["seed_loop"]["images_per_second"], tr["fast_path"]["images_per_second"]])
        axes[0].set(title=f"training, batch 64, {tr['threads']} threads", ylabel="images/s")
    if "inference" in r:
        inf = r["inference"]["batch1"]
        axes[1].bar(list(inf), list(inf.values()))
        axes[1].set(title="inference, batch 1, 1 thread", ylabel="us per image")
    if "serving" in r:
        sv = r["serving"]
        configs = dict(sv["configs"])
        if "shipped" in sv:
            configs = {"as shipped": sv["shipped"], **configs}
        for name, cfg in configs.items():
            cs = list(cfg["by_concurrency"])
            axes[2].plot(cs, [cfg["by_concurrency"][c]["requests_per_second"] for c in cs], "o-", label=name)
        cs = list(sv["ceiling"])
        axes[2].plot(cs, [sv["ceiling"][c]["requests_per_second"] for c in cs], "k--", label="loopback ceiling")
        axes[2].set(title="REST (wrk)", xlabel="concurrency", ylabel="requests/s (log)", xscale="log", yscale="log")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_results(path: Path) -> dict:
    """A results JSON, with the concurrency keys JSON turned into strings made integers again."""
    results = json.loads(path.read_text())
    serving = results.get("serving")
    if serving:
        serving["ceiling"] = {int(k): v for k, v in serving["ceiling"].items()}
        for cfg in [*serving["configs"].values(), *([serving["shipped"]] if "shipped" in serving else [])]:
            cfg["by_concurrency"] = {int(k): v for k, v in cfg["by_concurrency"].items()}
    return results
