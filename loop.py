"""The whole research loop in one command: train, collect, probe, evaluate, plan, steer, report.

    python train.py loop -c configs/loop/maze.yaml

Each stage is an ordinary run of ``train.py`` (so each has its own run folder, config.yaml,
summary.json and offline W&B run, and can be rerun alone with the command the report prints):

1. ``agent``: ``train.py fit`` with the PPO config, unless the loop folder already holds an agent
   trained from the same config and arguments (reused) or ``agent_ckpt`` names one;
   (a config may stop after any stage: without ``probe`` there is no probe or steer stage)
2. ``probe``: ``train.py fit`` with the probe config once per seed (the seed sets the episode
   split, the initialisation and the random floors), every seed in one process (``train.py runs``, so
   the cache is opened and verified, and its exact values solved, once); the first run collects the
   trajectory cache, the others reuse it; the first also plans with the probe, ridge and the critic;
   each seed's own command, which reruns it alone, is in the report;
3. ``steer``: ``train.py test`` with each steering config (the cheese vector against a random
   control; the value probe's direction, read from the first probe run), every scan in one process
   (``train.py runs``), each in its own ``steer_<name>`` run folder; each scan's own command is in the report;
4. ``report``: ``report.md`` with the headline figures (probe quality over seeds with its spread,
   per-layer ceilings and floors, planning, steering scans), each beside the command that
   regenerates it, and the figures copied into ``report/figures``.

Progress: one line per stage with its wall time; each stage's own output goes to ``logs/<stage>.log``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from innercritic.cache.format import file_sha256, jsonable, write_json_atomic
from innercritic.probing.findings import fmt as _fmt, probe_findings
from innercritic.errors import InnerCriticError, MissingFileError, exit_on_user_error

__all__ = ["main", "run_loop", "steering_verdicts", "write_report"]

ROOT = Path(__file__).resolve().parent


def _load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"loop config {str(path)!r} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    known = {"root", "agent", "probe", "steer"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InnerCriticError(f"loop config {str(path)!r} has unknown section(s) {unknown}; valid: {sorted(known)}")
    return config


def _command(*args: str) -> list[str]:
    return [sys.executable, "train.py", *args]


def _relative(text: str | Path) -> str:
    """``text`` with the repository root's prefix removed from any path in it."""
    return str(text).replace(str(ROOT) + os.sep, "")


def _shown(cmd: Sequence[str]) -> str:
    """A command as a reader would type it from the repository root (python train.py ..., relative paths)."""
    return " ".join(["python", *[_relative(a if " " not in a else repr(a)) for a in cmd[1:]]])


def _latest_run(folder: Path) -> Path:
    runs = sorted(folder.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not runs:
        raise RuntimeError(f"no run folder under {folder}")
    return runs[-1]


class LoopStopped(Exception):
    """SIGINT or SIGTERM reached the loop; the running stage has been stopped and waited for."""


def _on_signal(signum: int, frame: Any) -> None:
    raise LoopStopped(signal.Signals(signum).name)


class _Stages:
    """Runs stages as subprocesses, each in a process group of its own, resumable and stoppable.

    A stage's folder holds ``stage.json``: the hashes of its request (arguments, config file texts,
    input files) and its status. A stage whose request matches a finished one is skipped; one whose
    request changed is rerun, saying what changed; an interrupted training stage resumes from its
    ``last.ckpt`` (other stages are redone). Each stage's output goes to logs/<name>.log and, line by
    line, to the terminal; SIGINT / SIGTERM stop the running stage's whole process group and wait for
    it before the loop exits, so nothing keeps writing.
    """

    def __init__(self, root: Path, total: int) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.total, self.done = total, 0
        self.timings: dict[str, float] = {}
        self.commands: dict[str, str] = {}

    def run(self, name: str, cmd: list[str], folder: Path, inputs: Sequence[str | Path] = (), resumable: bool = False) -> Path:
        """Run (or skip, or resume) stage ``name``; returns its run folder (``folder/version_N``)."""
        return self._stage(name, [cmd], folder, [folder], inputs, resumable)[0]

    def run_all(self, name: str, cmds: Sequence[list[str]], folder: Path, outputs: Sequence[Path],
                inputs: Sequence[str | Path] = ()) -> list[Path]:
        """Stage ``name`` as the commands ``cmds`` run one after the other in one process (``train.py runs``,
        from ``folder/runs.json``), command k writing its run under ``outputs[k]``; returns those run folders.
        An interrupted one is redone whole."""
        return self._stage(name, list(cmds), folder, list(outputs), inputs, resumable=False)

    def _stage(self, name: str, cmds: list[list[str]], folder: Path, outputs: list[Path], inputs: Sequence[str | Path],
               resumable: bool) -> list[Path]:
        self.done += 1
        tag = f"[loop] stage {self.done}/{self.total} {name}"
        many = len(cmds) > 1
        cmd = _command("runs", str(folder / "runs.json")) if many else cmds[0]
        self.commands[name] = _shown(cmd)
        parts = _request_parts(cmds, inputs)
        request = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        marker = folder / "stage.json"
        previous = json.loads(marker.read_text()) if marker.is_file() else {}
        runs = [Path(r) for r in previous.get("runs", [previous["run"]] if "run" in previous else [])]
        if (previous.get("request") == request and previous.get("status") == "done" and runs
                and all((r / "summary.json").is_file() for r in runs)):
            print(f"{tag}: skipped, finished earlier with the same arguments, configs and inputs ({', '.join(_relative(r) for r in runs)})", flush=True)
            self.timings[name] = float(previous.get("seconds", 0.0))
            return runs
        if previous and previous.get("request") != request:
            changed = [k for k in parts if previous.get("parts", {}).get(k) != parts[k]] or ["request"]
            print(f"{tag}: rerun, its {' and '.join(changed)} changed since the earlier run", flush=True)
        elif previous.get("status") == "running":
            ckpt = _last_checkpoint(folder) if resumable else None
            if ckpt is not None:
                cmd = [*cmd, f"--ckpt_path={ckpt}"]
                print(f"{tag}: resuming the interrupted run from {_relative(ckpt)}", flush=True)
            else:
                print(f"{tag}: redoing the interrupted run", flush=True)
        print(f"{tag}: {_shown(cmd)}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        if many:
            (folder / "runs.json").write_text(json.dumps([c[2:] for c in cmds], indent=1) + "\n")  # without "python train.py"
        marker.write_text(json.dumps({"request": request, "parts": parts, "status": "running"}))
        start = time.perf_counter()
        returncode = self._spawn(name, cmd)
        self.timings[name] = time.perf_counter() - start
        if returncode != 0:
            lines = (self.logs / f"{name}.log").read_text().strip().splitlines()
            message = f"loop stage {name!r} failed (exit {returncode}): {_stage_error(lines)} -- full log: {self.logs / (name + '.log')}"
            # Exit 2 is a stage's user error (train.py's one-line `error: ...`): the loop's too; anything else is a crash.
            raise (InnerCriticError if returncode == 2 else StageCrash)(message)
        runs = [_latest_run(out) for out in outputs]
        marker.write_text(json.dumps({"request": request, "parts": parts, "status": "done", "runs": [str(r) for r in runs],
                                      "seconds": self.timings[name]}))
        print(f"{tag}: done in {self.timings[name]:.0f} s", flush=True)
        return runs

    def _spawn(self, name: str, cmd: list[str]) -> int:
        """Run ``cmd`` in a new process group, its output copied to the stage's log and the terminal."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.logs / f"{name}.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            copier = threading.Thread(target=_copy_output, args=(proc.stdout, log, name), daemon=True)
            copier.start()
            try:
                proc.wait()
            except LoopStopped:
                _stop_group(proc)
                raise
            finally:
                copier.join(timeout=5)
        return proc.returncode


def _copy_output(stream: Any, log: Any, name: str) -> None:
    # Progress bars redraw with carriage returns: the log keeps every byte, the terminal each updated line.
    for raw in iter(lambda: stream.read1(65536), b""):
        text = raw.decode("utf-8", "replace")
        log.write(text)
        log.flush()
        sys.stdout.write(text)
        sys.stdout.flush()


def _stop_group(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM to the stage's whole process group (its DDP ranks, W&B's service), then wait; SIGKILL after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _request_parts(cmds: Sequence[Sequence[str]], inputs: Sequence[str | Path]) -> dict[str, str]:
    """What decides a stage's outputs, each part hashed: its commands' arguments, the texts of their config
    files, its input files."""
    args = [[a for a in cmd[1:] if not a.startswith("--ckpt_path=")] for cmd in cmds]
    configs = sorted({a[i + 1] for a in args for i, flag in enumerate(a[:-1]) if flag in ("-c", "--config")})

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]

    return {"arguments": digest(args[0] if len(args) == 1 else args), "configs": digest({c: (ROOT / c).read_text() for c in configs}),
            "inputs": digest({str(p): file_sha256(p) for p in inputs})}


def _last_checkpoint(folder: Path) -> Path | None:
    """The newest run's last.ckpt under ``folder``, None when there is none (a run stopped before its first)."""
    if not any(folder.glob("version_*")):
        return None
    ckpt = _latest_run(folder) / "checkpoints" / "last.ckpt"
    return ckpt if ckpt.is_file() else None


class StageCrash(RuntimeError):
    """A stage ended with an error that is not the user's (its traceback is in the stage's log)."""


def _stage_error(lines: Sequence[str]) -> str:
    """The one line that says why a stage failed: its `error: ...` line, else the last exception line of its traceback."""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):].strip()
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line):
            return line.strip()
    return lines[-1].strip() if lines else "(no output)"


def run_loop(config_path: str | Path, overrides: dict[str, Any] | None = None) -> Path:
    """Run every stage of the loop described by a loop config (with ``overrides`` of its keys); returns the report's path."""
    config = _load(config_path)
    for key, value in (overrides or {}).items():
        _set(config, key, value)
    root = Path(config.get("root", "runs/loop"))
    if not root.is_absolute():
        root = ROOT / root
    probe = config.get("probe") or {}
    probe_config = probe.get("config", "configs/probe/maze.yaml")
    seeds = [int(s) for s in probe.get("seeds", [0, 1, 2])] if probe else []
    if probe and not seeds:
        raise InnerCriticError("loop config probe.seeds is empty; give at least one seed")
    if config.get("steer") and not seeds:
        raise InnerCriticError("loop config has a steer section but no probe section: steering reads the probe runs")
    agent = config.get("agent", {})
    steer = config.get("steer") or {}
    stages = _Stages(root, total=(0 if agent.get("agent_ckpt") else 1) + (1 if seeds else 0) + (1 if steer else 0))
    start = time.perf_counter()
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if agent.get("agent_ckpt"):
            agent_ckpt, agent_run = str(agent["agent_ckpt"]), None
        else:
            folder = root / "agent"
            args = ["fit", "-c", agent.get("config", "configs/ppo/maze.yaml"), f"--trainer.default_root_dir={folder}",
                    *[str(a) for a in agent.get("args", [])]]
            agent_run = stages.run("agent", _command(*args), folder, resumable=True)
            agent_ckpt = str(agent_run / "checkpoints" / "last.ckpt")

        probe_runs = []
        if seeds:
            # One process for every seed (``train.py runs``): they share one load of the cache and its exact
            # values. Each seed's command is also the one that reruns that seed alone.
            cmds = []
            for k, seed in enumerate(seeds):
                args = ["fit", "-c", probe_config, f"--data.agent_ckpt={agent_ckpt}", f"--data.cache_dir={root / 'cache'}",
                        f"--seed_everything={seed}", f"--data.split_seed={seed}", f"--model.eval_seed={seed}",
                        f"--trainer.default_root_dir={root / f'probe_seed{seed}'}", *[str(a) for a in probe.get("args", [])]]
                if k == 0 and probe.get("planning_episodes"):
                    args.append(f"--model.planning_episodes={int(probe['planning_episodes'])}")
                cmds.append(_command(*args))
                stages.commands[f"probe_seed{seed}"] = _shown(cmds[-1])
            probe_runs = stages.run_all("probe", cmds, root / "probe", [root / f"probe_seed{seed}" for seed in seeds], inputs=[agent_ckpt])

        steer_runs = {}
        first_summary = json.loads((probe_runs[0] / "summary.json").read_text()) if probe_runs else {}
        cmds, inputs = [], [agent_ckpt]
        for name, spec in steer.items():
            args = ["test", "-c", spec.get("config", "configs/steer/maze.yaml"), f"--model.agent_ckpt={agent_ckpt}",
                    f"--trainer.default_root_dir={root / f'steer_{name}'}", *[str(a) for a in spec.get("args", [])]]
            if spec.get("probe"):  # steer along a probe of the first probe run (default: at its headline hook point)
                hook = spec.get("hook") or first_summary["hook"]
                path = probe_runs[0] / "probes" / f"{spec['probe']}@{hook}.pt"
                if not path.is_file():
                    raise InnerCriticError(f"loop steer.{name}: no probe {spec['probe']!r} at {hook!r} in {probe_runs[0] / 'probes'}")
                args += ["--model.vector_source=probe", f"--model.vector_path={path}", f"--model.hook={hook}"]
                inputs.append(path)
            cmds.append(_command(*args))
            stages.commands[f"steer_{name}"] = _shown(cmds[-1])
        if steer:
            # One process for every scan, as for the probe seeds: a process each paid its imports, its W&B
            # service and the agent's load again (about 5 s a scan). Each scan's command reruns it alone.
            runs = stages.run_all("steer", cmds, root / "steer", [root / f"steer_{name}" for name in steer], inputs=inputs)
            steer_runs = dict(zip(steer, runs))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    report = write_report(root, agent_run, probe_runs, steer_runs, stages.commands, stages.timings,
                          time.perf_counter() - start, str(config_path))
    print(f"[loop] report: {report}", flush=True)
    return report


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    """``config[a][b] = value`` for ``dotted`` "a.b", creating sections as needed."""
    *path, last = dotted.split(".")
    node = config
    for key in path:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise InnerCriticError(f"loop override --{dotted}: {key!r} is not a section of the loop config")
    node[last] = value


# ---------------------------------------------------------------------------------------------
# The report


# Per vector source: the behaviours the literature reports, each as (metric, sign of the coefficient,
# direction, what is done). Mini et al. 2023: subtracting the cheese vector makes the mouse ignore the
# cheese at the decision square; adding the top-right vector sends it toward the top-right corner, and
# subtracting it keeps the mouse away from the corner; moving the cheese's representation retargets the mouse.
EXPECTED_EFFECTS = {
    "cheese": [("p_decision_cheese", -1, "down", "Subtracting the per-maze cheese vector")],
    "cheese_averaged": [("p_decision_cheese", -1, "down", "Subtracting the cheese vector averaged over mazes")],
    "top_right": [("p_decision_top_right", 1, "up", "Adding the per-maze top-right vector"),
                  ("p_top_right", -1, "down", "Subtracting the per-maze top-right vector")],
    "top_right_averaged": [("p_decision_top_right", 1, "up", "Adding the top-right vector averaged over mazes"),
                           ("p_top_right", -1, "down", "Subtracting the top-right vector averaged over mazes")],
    "retarget": [("p_target", 1, "up", "Adding the per-maze retargeting vector")],
}
METRIC_NAMES = {"p_decision_cheese": "P(first move toward the cheese at the decision square)",
                "p_decision_top_right": "P(first move toward the top-right corner at the decision square)",
                "p_cheese": "P(reach cheese)", "p_top_right": "P(reach the top-right corner)",
                "p_target": "P(reach the level's retargeting square)"}


def steering_verdicts(scan: Sequence[dict[str, Any]]) -> list[str]:
    """One sentence per behaviour the literature reports for the scan's vector source (``EXPECTED_EFFECTS``):
    whether the scan shows it against the matched random control, with the figures.

    Decided on 95% intervals, never tuned: at a coefficient of the expected sign the effect counts when
    the vector's interval lies wholly beyond the unsteered one in the expected direction and the
    control's interval at the same coefficient does not. The coefficient quoted is the smallest in
    magnitude where that holds (else the largest in magnitude, with what failed). Empty when the scan
    has no such source, no unsteered row or no coefficient of the expected sign.
    """
    source = next((r["source"] for r in scan if r.get("source") in EXPECTED_EFFECTS), None)
    if source is None:
        return []
    return [v for v in (_verdict(scan, source, *check) for check in EXPECTED_EFFECTS[source]) if v]


def _verdict(scan: Sequence[dict[str, Any]], source: str, metric: str, sign: int, direction: str, action: str) -> str | None:
    rows = {r["coefficient"]: r for r in scan if r.get("source") == source and metric in r}
    control = {r["coefficient"]: r for r in scan if r.get("source") == "random" and metric in r}
    candidates = sorted((c for c in rows if c * sign > 0 and math.isfinite(rows[c][metric])), key=abs)
    if 0 not in rows or not any(c * sign > 0 for c in rows):
        return None
    base = rows[0]
    if not math.isfinite(base[metric]) or not candidates:
        return (f"{action} (`{source}`): the published effect cannot be judged: {METRIC_NAMES[metric]} is undefined "
                f"(no episode reached its maze's decision square; n_decision {base.get('n_decision', 0)} unsteered): play more episodes.")

    def beyond(row: dict[str, Any] | None) -> bool:
        if row is None or not math.isfinite(row.get(metric, math.nan)):
            return False
        return row[f"{metric}_hi"] < base[f"{metric}_lo"] if direction == "down" else row[f"{metric}_lo"] > base[f"{metric}_hi"]

    def show(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.2f} [{row[key + '_lo']:.2f}, {row[key + '_hi']:.2f}]"

    found = next((c for c in candidates if beyond(rows[c]) and not beyond(control.get(c))), None)
    c = found if found is not None else candidates[-1]
    steered, ctrl = rows[c], control.get(c)
    if found is not None:
        verdict = "**reproduces**"
    elif beyond(steered):
        verdict = "**does not reproduce as a vector-specific effect** (the matched random vector moves it as far)"
    else:
        verdict = f"**does not reproduce** (the figure does not leave the unsteered interval at any coefficient up to {c:g})"
    ratio = f" (x{steered[metric] / base[metric]:.2f})" if base[metric] > 0 else ""
    evidence = (f"at coefficient {c:g}, {METRIC_NAMES[metric]} {show(steered, metric)}{ratio} against {show(base, metric)} unsteered"
                + (f" and {show(ctrl, metric)} for the matched random control" if ctrl and math.isfinite(ctrl.get(metric, math.nan)) else ""))
    others = [m for m in ("p_cheese", "p_top_right") if m != metric and m in steered and m in base]
    if others:
        evidence += "; " + ", ".join(f"{METRIC_NAMES[m]} {show(steered, m)} against {show(base, m)}" for m in others)
    return f"{action} (`{source}`): the published effect {verdict}: {evidence}."


def write_report(root: Path, agent_run: Path | None, probe_runs: list[Path], steer_runs: dict[str, Path],
                 commands: dict[str, str], timings: dict[str, float], wall_s: float, config_path: str) -> Path:
    """report.md and report/figures/ from the stages' summary.json files and figures."""
    out = root / "report"
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    lines = ["# InnerCritic loop report", "", f"Regenerate everything: `python train.py loop -c {config_path}` "
             f"(whole loop {wall_s / 60:.1f} min on this machine; stage times: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ").", ""]

    if agent_run is not None and (agent_run / "summary.json").is_file():
        s = json.loads((agent_run / "summary.json").read_text())
        lines += ["## Agent", "", f"`{commands.get('agent', '')}`", "",
                  "| figure | value |", "|---|---|"]
        for key in ("success_train_dist", "success_heldout", "p_cheese_heldout", "p_top_right_heldout", "mean_return", "env_steps", "wall_s"):
            if key in s:
                lines.append(f"| {key} | {_fmt(s[key]) if isinstance(s[key], float) else s[key]} |")
        lines.append("")

    summaries = [json.loads((run / "summary.json").read_text()) for run in probe_runs]
    if not summaries:
        path = out / "report.md"
        path.write_text("\n".join(lines) + "\n")
        write_json_atomic(out / "summary.json", {"stage_seconds": {k: round(v, 1) for k, v in timings.items()},
                                                 "loop_seconds": round(wall_s, 1)})
        return path
    probe_lines, results = probe_findings(summaries, [run.parent.name for run in probe_runs], commands)
    lines += probe_lines
    first_figs = probe_runs[0] / "figures"
    for name in ("probe_vs_return", "value_traces", "per_layer", "planning"):
        if (first_figs / f"{name}.png").is_file():
            shutil.copy(first_figs / f"{name}.png", figures / f"{name}.png")
            lines += ["", f"![{name}](figures/{name}.png)", f"Regenerate: `{commands.get(probe_runs[0].parent.name, '')}`"]
    planning = summaries[0].get("planning")
    if planning:
        lines += ["", "## Planning (one-step lookahead)", "", f"On {planning[0].get('episodes', '?')} held-out levels of the "
                  "cache's distribution. The `exact` row plans on the exact value of the policy: it validates the planner (it "
                  "must reach the cheese nearly always), so a value source that fails where it succeeds fails on its own.", "",
                  "| source | success | 95% interval | return | agreement with the policy (policy's states) |", "|---|---|---|---|---|"]
        for r in planning:
            lines.append(f"| {r['source']} | {_fmt(r['success'])} | [{_fmt(r['success_lo'])}, {_fmt(r['success_hi'])}] | "
                         f"{_fmt(r.get('return'))} | {_fmt(r.get('agree_policy_states'))} |")
            name = r["source"].split(":")[0] if r["source"].startswith("probe:") else r["source"]
            results.setdefault("planning", {})[name] = {"success": r["success"], "success_ci": [r["success_lo"], r["success_hi"]]}

    for name, run in steer_runs.items():
        s = json.loads((run / "summary.json").read_text())
        scan = s.get("scan", [])
        lines += ["", f"## Steering: {name}", "", f"`{commands.get('steer_' + name, '')}`", ""]
        for verdict in steering_verdicts(scan):
            lines += [verdict, ""]
        if scan and scan[0].get("per_level"):
            lines += ["The vector is built in each maze played (that maze's own contrast pair, at the start); the random control "
                      "has, level by level, the same norm. `vector_norm` is the mean over the episodes.", ""]
        metrics = [m for m in ("p_decision_cheese", "p_decision_top_right", "p_target", "p_cheese", "p_top_right", "success", "kl", "value_change",
                               "n_decision", "vector_norm") if scan and m in scan[0]]
        lines += ["| source | coefficient | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for r in scan:
            cells = [f"{_fmt(r[m])} [{_fmt(r.get(m + '_lo'))}, {_fmt(r.get(m + '_hi'))}]" if m + "_lo" in r else _fmt(r[m]) for m in metrics]
            lines.append(f"| {r.get('source', '')} | {_fmt(r.get('coefficient'), 2)} | " + " | ".join(cells) + " |")
        for png in sorted(run.glob("*.png")):
            target = figures / f"steer_{name}_{png.name}"
            shutil.copy(png, target)
            lines += ["", f"![{png.stem}](figures/{target.name})", f"Regenerate: `{commands.get('steer_' + name, '')}`"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    write_json_atomic(out / "summary.json", jsonable({"stage_seconds": {k: round(v, 1) for k, v in timings.items()},
                                                      "loop_seconds": round(wall_s, 1), **results}))
    return path


def main(args: list[str] | None = None) -> None:
    """``python train.py loop -c CONFIG [--root DIR] [--section.key VALUE ...]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="train.py loop", description="Run the whole InnerCritic loop from a loop config.",
        epilog="Any key of the loop config can be overridden as --section.key VALUE (VALUE read as YAML), e.g. "
               "--root runs/x --agent.args '[\"--model.total_env_steps=50000\"]' --probe.seeds '[0]'. A rerun skips the "
               "stages that finished with the same request, resumes an interrupted training stage and redoes other "
               "interrupted stages.")
    parser.add_argument("-c", "--config", required=True, help="a loop config, e.g. configs/loop/maze.yaml")
    parser.add_argument("--root", help="the loop's folder (the config's root)")
    ns, rest = parser.parse_known_args(args)
    overrides: dict[str, Any] = {} if ns.root is None else {"root": ns.root}
    while rest:
        key = rest.pop(0)
        if not key.startswith("--") or "=" not in key and not rest:
            parser.error(f"unexpected argument {key!r}; overrides are --section.key VALUE")
        key, value = key[2:].split("=", 1) if "=" in key else (key[2:], rest.pop(0))
        overrides[key] = yaml.safe_load(value)
    try:
        exit_on_user_error(lambda: run_loop(ns.config, overrides))  # a user error: one line and exit 2
    except StageCrash as err:
        sys.exit(f"error: {err}")  # one line and exit 1: the stage's log holds its traceback
    except LoopStopped as err:
        print(f"error: loop stopped by {err}; the running stage was stopped and waited for. Rerun the same command to resume.",
              file=sys.stderr, flush=True)
        sys.exit(130)
