"""ValueProbe: known linear values recovered, agreement with the closed forms, fine-tuning, resuming, the CLI run.

The synthetic datamodule builds episodes whose value is exactly linear in the features: with
``r_t = v(s_t) - gamma v(s_{t+1})`` (and ``r = v(s)`` on the terminating step), both the Monte-Carlo
return and the TD fixed point equal ``v``. With noise on the rewards the two optima part: the ``mc``
probe must then land on ridge's solution and the ``td`` probe on LSTD's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import write_agent_checkpoint
from innercritic.probing.closed_form import fit_lstd, fit_ridge
from innercritic.probing.evaluate import Split
from lightning_modules.steering import _probe_vector
from lightning_modules.value_probe import ValueProbe, _successors
from wandb_records import history_keys, run_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
HOOK = "h.hook_out"


class LinearValueData(L.LightningDataModule):
    """Episodes of AR(1) Gaussian features whose value under version i is ``w_i . x + b_i`` (+ ``nonlinear * relu(x_0 - m_0) x_1``)."""

    def __init__(self, dim: int = 5, versions: int = 2, episodes: int = 150, gamma: float = 0.9, noise: float = 0.0,
                 nonlinear: float = 0.0, seed: int = 0, batch_size: int = 256, static: int = 0, dominant: float = 0.0,
                 collinear: float = 0.0) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        self.gamma, self.batch_size = gamma, batch_size
        self.hooks, self.version_names = [HOOK], ["policy"] + [f"eps:{0.25 * i}" for i in range(1, versions)]
        self.num_versions = versions
        self.w_true = rng.normal(size=(versions, dim))
        self.b_true = np.linspace(0.5, -0.5, versions)
        if dominant:
            # What the label-free probe assumes: every version values states along one direction, the policy
            # above its noisy versions everywhere (b decreasing), and that direction carries the largest
            # variance of the standardised features (``dominant`` more standard deviations along it than
            # across). Its weights are +-1, so every feature has the same variance and standardising, which
            # divides each by its own spread, leaves the direction where it is.
            self.w_true[:] = rng.choice([-1.0, 1.0], size=dim)
            u = self.w_true[0] / np.linalg.norm(self.w_true[0])
        if collinear:
            # Feature 1 nearly repeats feature 0 (z_1 <- z_0 + collinear z_1) and the value lives in their difference:
            # a direction with about collinear^2 of their variance, along which a plain gradient step barely moves.
            self.w_true[:, 0], self.w_true[:, 1] = -1.0 / collinear, 1.0 / collinear
        offset = rng.normal(3.0, 1.0, size=dim)  # features far from standardised, so the statistics matter
        cols: dict[str, list] = {k: [] for k in ("x", "reward", "terminal", "ret", "value", "version", "episode", "step", "last", "exact")}
        for v in range(versions):
            for e in range(episodes):
                length = int(rng.integers(4, 16))
                # AR(1) features: successive states are alike, as in an environment, so bootstrapping matters.
                z = rng.normal(size=(length + 1, dim))
                for t in range(1, length + 1):
                    z[t] = 0.8 * z[t - 1] + 0.6 * z[t]
                if static:  # features fixed for the whole episode (a maze's walls): TD learns them slowly
                    z[:, :static] = rng.normal(size=static)
                if dominant:
                    z = z + dominant * (z @ u)[:, None] * u
                if collinear:
                    z[:, 1] = z[:, 0] + collinear * z[:, 1]
                x = z + offset
                # A nonlinear part no linear probe can fit: MC regression and the TD fixed point then differ.
                value = x @ self.w_true[v] + self.b_true[v] + nonlinear * np.maximum(x[:, 0] - offset[0], 0.0) * x[:, 1]
                value[-1] = 0.0  # the terminal state
                reward = value[:-1] - gamma * value[1:] + noise * rng.normal(size=length)
                ret = np.zeros(length + 1)
                for t in reversed(range(length)):
                    ret[t] = reward[t] + gamma * ret[t + 1]
                cols["x"].append(x)
                cols["reward"].append(np.r_[reward, 0.0])
                cols["terminal"].append(np.r_[np.zeros(length - 1), 1.0, 0.0])
                cols["ret"].append(ret)
                cols["value"].append(value + 0.1 * rng.normal(size=length + 1))
                cols["exact"].append(value)
                cols["version"].append(np.full(length + 1, v))
                cols["episode"].append(np.full(length + 1, v * episodes + e))
                cols["step"].append(np.arange(length + 1))
                cols["last"].append(np.r_[np.zeros(length, bool), True])
        self.c = {k: np.concatenate(a) for k, a in cols.items()}
        self.num_states = len(self.c["x"])
        self.feature_dims = {HOOK: dim}
        perm = rng.permutation(episodes)
        parts = {"train": perm[:int(0.7 * episodes)], "calib": perm[int(0.7 * episodes):int(0.8 * episodes)],
                 "test": perm[int(0.8 * episodes):]}
        local = self.c["episode"] % episodes
        self.rows = {k: np.flatnonzero(np.isin(local, p) & ~self.c["last"]) for k, p in parts.items()}
        train_states = np.flatnonzero(np.isin(local, parts["train"]))
        x = self.c["x"][train_states]
        self.stats = {HOOK: {"mean": torch.tensor(x.mean(0), dtype=torch.float32), "std": torch.tensor(x.std(0), dtype=torch.float32)}}

    def standardised(self, rows: np.ndarray) -> np.ndarray:
        return (self.c["x"][rows] - self.stats[HOOK]["mean"].numpy()) / self.stats[HOOK]["std"].numpy()

    def batch(self, rows: np.ndarray) -> dict:
        c, f = self.c, lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        return {"x": {HOOK: f(self.standardised(rows))}, "x_next": {HOOK: f(self.standardised(rows + 1))}, "reward": f(c["reward"][rows]),
                "terminal": f(c["terminal"][rows]), "truncated": torch.zeros(len(rows)), "ret": f(c["ret"][rows]),
                "bootstrapped": torch.zeros(len(rows)), "value": f(c["value"][rows]),
                "version": torch.as_tensor(c["version"][rows], dtype=torch.int64),
                "state_index": torch.as_tensor(rows, dtype=torch.int64),
                "episode": torch.as_tensor(c["episode"][rows]), "step": torch.as_tensor(c["step"][rows])}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        rows = self.rows[split]
        return DataLoader(range(len(rows)), batch_size=self.batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(0), collate_fn=lambda idx: self.batch(rows[np.asarray(idx)]))

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("calib", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def split_arrays(self, split: str) -> Split:
        rows, c = self.rows[split], self.c
        return Split(x={HOOK: self.standardised(rows)}, x_next={HOOK: self.standardised(rows + 1)}, reward=c["reward"][rows], terminal=c["terminal"][rows],
                     ret=c["ret"][rows], value=c["value"][rows], value_next=c["value"][rows + 1], version=c["version"][rows],
                     step=c["step"][rows], episode=c["episode"][rows], exact=c["exact"][rows])


def fit(model: ValueProbe, dm: L.LightningDataModule, epochs: int, root: Path | None = None, **kw) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=root is not None, default_root_dir=root,
                        num_sanity_val_steps=0, **kw)
    trainer.fit(model, datamodule=dm)
    return trainer


def row(model: ValueProbe, source: str, version: str = "policy", hook: str | None = HOOK) -> dict:
    return next(r for r in model.results["table"] if r["source"] == source and r["hook"] == hook and r["version"] == version)


def raw_weights(model: ValueProbe, dm: LinearValueData, config: str) -> np.ndarray:
    """The probe as (w, b) on raw features, per head: undo the standardisation."""
    w, b = model.linear_map(config, HOOK)
    mean, std = dm.stats[HOOK]["mean"].double(), dm.stats[HOOK]["std"].double()
    w_raw = w.double() / std
    return np.c_[w_raw.numpy(), (b.double() - w_raw @ mean).numpy()]


@pytest.mark.parametrize("solver", ["closed_form", "sgd"])
def test_mc_td_and_both_recover_a_known_linear_value(solver):
    dm = LinearValueData(noise=0.0)
    model = ValueProbe(configs={"mc": {"mc": 1.0}, "td": {"td": 1.0}, "mc_td": {"mc": 1.0, "td": 1.0}}, lr=0.05, solver=solver)
    trainer = fit(model, dm, epochs=40)
    assert trainer.global_step == (0 if solver == "closed_form" else 40 * len(dm._loader("train", False))), "closed form: no step"
    truth = np.c_[dm.w_true, dm.b_true]
    for config in ("mc", "td", "mc_td"):
        for i, version in enumerate(dm.version_names):
            r = row(model, f"probe:{config}", version)
            assert r["r2_return"] > 0.99 and r["r2_exact"] > 0.99, (config, version, r)
        assert np.allclose(raw_weights(model, dm, config), truth, atol=0.05 if solver == "sgd" else 0.01), config
    summary = model.summary()
    assert summary["probe/r2_return"] > 0.99 and summary["ridge/r2_return"] > 0.99 and summary["lstd/r2_return"] > 0.99
    assert summary["probe/r2_return_exact"] > 0.99 and summary["hook"] == HOOK and summary["probe_config"] == "mc"
    assert summary["loss_weights"]["td"]["td"] == 1.0
    floors = {r["source"]: r["r2_return"] for r in model.results["table"] if r["version"] == "policy"}
    assert floors["mean"] < 0.01 and floors["time"] < 0.2, "floors sit far below a probe that recovers the value"


def test_sgd_probes_land_on_the_closed_forms_when_mc_and_td_disagree():
    dm = LinearValueData(noise=0.5, nonlinear=2.0, versions=1, episodes=200, dim=4, seed=1, batch_size=128)
    model = ValueProbe(configs={"mc": {"mc": 1.0}, "td": {"td": 1.0}}, lr=0.1, solver="sgd")
    fit(model, dm, epochs=80)
    # The closed forms with the penalties they chose on the calibration split: the SGD probes were given the
    # matching L2 strength (penalty="match"), so each must land on its counterpart's regularised optimum.
    ridge, lstd = model.ceilings[HOOK][0]["ridge"], model.ceilings[HOOK][0]["lstd"]
    tr = dm.split_arrays("train")
    unregularised = fit_ridge(tr.x[HOOK], tr.ret, alphas=(0.0,))
    assert np.abs(ridge.w - unregularised.w).max() < 0.05, "a well-posed problem: the chosen penalty is mild"
    w_mc, b_mc = (t.numpy()[0] for t in model.linear_map("mc", HOOK))
    w_td, b_td = (t.numpy()[0] for t in model.linear_map("td", HOOK))
    assert max(np.abs(lstd.w - ridge.w).max(), abs(lstd.b - ridge.b)) > 0.1, "the problem must separate the two optima for the test to mean anything"
    assert np.allclose(w_mc, ridge.w, atol=0.02) and abs(b_mc - ridge.b) < 0.02
    assert np.allclose(w_td, lstd.w, atol=0.02) and abs(b_td - lstd.b) < 0.02


def test_closed_form_heads_are_the_stationary_points_of_their_losses_and_only_the_rest_train():
    """The default solver: a mc/td mix's heads are where the gradient of its training loss (with its L2 term)
    vanishes, a lone mc or td head is ridge or LSTD at the matched penalty, and the label-free configuration
    beside them is the only one the steps move."""
    dm = LinearValueData(noise=0.5, nonlinear=2.0, versions=2, episodes=120, dim=4, seed=1, batch_size=10**6)
    model = ValueProbe(configs={"mc": {"mc": 1.0}, "td": {"td": 1.0}, "mix": {"mc": 1.0, "td": 3.0},
                                "unsup": {"slack": 1.0, "neg_var": 0.1}}, lr=0.02)
    assert model.closed_form == ["mc", "td", "mix"] and model.sgd_configs == ["unsup"]
    seen = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, module):
            seen.update({k: h.weight.detach().clone() for k, h in module.heads.items()})

    trainer = fit(model, dm, epochs=5, callbacks=[Capture()])
    assert trainer.global_step == 5
    for key, head in model.heads.items():
        moved = not torch.equal(seen[key], head.weight.detach())
        assert moved == key.startswith("unsup@") and head.weight.requires_grad == key.startswith("unsup@"), key
    for i in range(dm.num_versions):
        ridge, lstd = model.ceilings[HOOK][i]["ridge"], model.ceilings[HOOK][i]["lstd"]
        for config, fit_ in (("mc", ridge), ("td", lstd)):
            w, b = (t.numpy()[i] for t in model.linear_map(config, HOOK))
            assert np.allclose(w, fit_.w, atol=1e-5) and abs(b - fit_.b) < 1e-5, config
    # The mix: the gradient of the loss the SGD path would minimise is zero at the closed-form heads.
    mix = model.heads[f"mix@{HOOK.replace('.', ':')}"]
    mix.requires_grad_(True)
    batch = dm.batch(dm.rows["train"])
    model.closed_form = ["mc", "td"]  # let _loss include the mix, as a training step of the sgd solver would
    model.log_dict = lambda *a, **k: None
    loss = model._loss(batch, "train")
    grad = torch.autograd.grad(loss, mix.weight)[0]
    assert grad.abs().max() < 1e-4 * max(1.0, float(mix.weight.abs().max())), grad
    probe_row, ridge_row = row(model, "probe:mix"), row(model, "ridge")
    assert probe_row["r2_return"] > 0.5 and ridge_row["r2_return"] > 0.5


def test_full_batch_steps_land_td_on_lstd_along_features_fixed_within_an_episode():
    """The maze's hard case: with gamma 0.99, semi-gradient TD's expected step along a feature that never
    changes within an episode is scaled by 1 - gamma, and minibatch noise drowns it; exact gradients do not."""
    dm = LinearValueData(dim=4, static=2, versions=1, episodes=200, gamma=0.99, noise=0.5, nonlinear=1.0, seed=5,
                         batch_size=10**6)  # larger than the split: one batch, every step a full-batch step
    model = ValueProbe(configs={"td": {"td": 1.0}}, lr=0.05, solver="sgd")
    trainer = fit(model, dm, epochs=200)
    assert trainer.global_step == 200
    lstd = model.ceilings[HOOK][0]["lstd"]
    w_td, b_td = (t.numpy()[0] for t in model.linear_map("td", HOOK))
    assert np.abs(lstd.w[:2]).max() > 0.5, "the static features carry weight, so the test means something"
    # 0.0002 measured; 64-transition minibatches for 12 epochs (264 steps, the same lr) stop at 0.0105.
    assert np.allclose(w_td, lstd.w, atol=0.005) and abs(b_td - lstd.b) < 0.005, (w_td, lstd.w, b_td, lstd.b)


def test_preconditioned_sgd_lands_td_on_lstd_where_the_value_lives_in_a_low_variance_direction():
    """What ``precondition`` is for (the conv layers' case, issue 19): when the value is carried by a direction
    with a small share of the standardised features' variance, Adam's steps on the raw weights cover it far too
    slowly; in the whitened coordinates of the train split's Gram the same loss is well conditioned."""
    gaps, weights = {}, {}
    for precondition in (False, True):
        dm = LinearValueData(dim=4, versions=1, episodes=200, gamma=0.95, noise=0.5, collinear=0.05, seed=5, batch_size=10**6)
        model = ValueProbe(configs={"td": {"td": 1.0}}, lr=0.05, solver="sgd", precondition=precondition)
        fit(model, dm, epochs=300)
        gaps[precondition] = abs(row(model, "probe:td")["r2_return"] - row(model, "lstd")["r2_return"])
        lstd = model.ceilings[HOOK][0]["lstd"]
        weights[precondition] = np.abs(model.linear_map("td", HOOK)[0].numpy()[0] - lstd.w).max() / np.abs(lstd.w).max()
    assert gaps[False] > 0.1, f"the case must be hard for the plain fit to mean anything ({gaps})"
    assert gaps[True] < 0.01 and weights[True] < 0.02, (gaps, weights)


@pytest.mark.parametrize("whole", [True, False], ids=["full-batch", "shuffled-minibatch"])
def test_values_at_the_next_state_read_from_the_batch_equal_those_computed_from_x_next(whole):
    """The loss reads V(s_{t+1}) from the values at s_t where the successor row is in the batch (a full batch
    holds all but the episodes' last states): the values, and the gradients through them (terminal_zero
    differentiates V at the next state), must be those of the direct pass over ``x_next``."""
    dm = LinearValueData(versions=2, episodes=20, seed=4)
    rows = dm.rows["train"] if whole else np.random.default_rng(0).permutation(dm.rows["train"])[:64]
    batch = dm.batch(rows)
    model = ValueProbe(configs={"td": {"td": 1.0, "terminal_zero": 1.0}})
    model.heads["td@h:hook_out"] = torch.nn.Linear(dm.feature_dims[HOOK], 2)
    at, found = _successors(batch["state_index"])
    assert found.float().mean() > (0.8 if whole else 0.0) and not found.all(), "both kinds of row must be exercised"
    v = model.values(["td"], HOOK, batch["x"][HOOK])
    read = model._next_values(["td"], HOOK, v, batch["x_next"][HOOK], at, found)["td"]
    direct = model.values(["td"], HOOK, batch["x_next"][HOOK])["td"]
    assert torch.allclose(read, direct, atol=1e-6)
    weight = model.heads["td@h:hook_out"].weight
    grads = [torch.autograd.grad((out ** 2).sum(), weight)[0] for out in (read, direct)]
    assert torch.allclose(*grads, rtol=1e-4, atol=1e-5)


def test_every_supervised_head_starts_at_its_best_constant_predictor():
    dm = LinearValueData(versions=2, seed=3)
    model = ValueProbe(configs={"mc": {"mc": 1.0}, "td": {"td": 1.0}, "mix": {"mc": 1.0, "td": 3.0}}, solver="sgd")
    fit(model, dm, epochs=1, limit_train_batches=0)  # setup only: no step moves the heads
    tr = dm.split_arrays("train")
    for i in range(dm.num_versions):
        r = tr.rows(i)
        zero_x = np.zeros((len(r), 1))  # a constant predictor: the intercept is all there is
        ridge_b = fit_ridge(zero_x, tr.ret[r], alphas=(1.0,)).b  # unpenalised intercept
        lstd_b = fit_lstd(zero_x, zero_x, tr.reward[r], tr.terminal[r], dm.gamma, alpha=1.0).b
        assert abs(ridge_b - lstd_b) > 0.05, "the two constant optima must differ for the test to mean anything"
        start = {c: float(model.heads[f"{c}@{HOOK.replace('.', ':')}"].bias[i]) for c in ("mc", "td", "mix")}
        assert start["mc"] == pytest.approx(ridge_b, abs=1e-5)
        assert start["td"] == pytest.approx(lstd_b, abs=1e-5)
        # the mix's constant zeroes mc's gradient plus 3 x TD's semi-gradient
        live = 1.0 - tr.terminal[r]
        mix_grad = (start["mix"] - tr.ret[r]).mean() + 3.0 * (start["mix"] - tr.reward[r] - dm.gamma * live * start["mix"]).mean()
        assert abs(mix_grad) < 1e-5


def test_on_a_wide_layer_with_few_episodes_the_matched_penalty_keeps_the_sgd_probe_on_ridge():
    dm = LinearValueData(dim=80, versions=1, episodes=40, noise=1.0, nonlinear=1.0, seed=4, batch_size=64)
    model = ValueProbe(configs={"mc": {"mc": 1.0}, "td": {"td": 1.0}}, lr=0.1, solver="sgd")
    fit(model, dm, epochs=100)
    probe, ridge = row(model, "probe:mc"), row(model, "ridge")
    assert ridge["alpha"] >= 1.0, "the calibration split asks for real regularisation here"
    assert abs(probe["r2_return"] - ridge["r2_return"]) < 0.02, (probe["r2_return"], ridge["r2_return"])
    assert abs(row(model, "probe:td")["r2_return"] - row(model, "lstd")["r2_return"]) < 0.02


def test_unsupervised_probe_is_scaled_calibrated_and_judged_on_dominance():
    dm = LinearValueData(noise=0.0, versions=3, episodes=100)
    model = ValueProbe(configs={"unsup": {"slack": 1.0, "neg_var": 0.1}}, lr=0.02)
    fit(model, dm, epochs=10)
    w, _ = model.linear_map("unsup", HOOK)
    assert torch.isclose(w[0].norm(), torch.tensor(1.0), atol=1e-5), "the scale constraint holds head 0 at unit norm"
    r = row(model, "probe:unsup", "eps:0.25")
    assert r["labelled_episodes"] == 10 and 0.0 <= r["dominance"] <= 1.0
    floors = [row(model, s) for s in ("random_dir", "top_pc")]
    assert all("labelled_episodes" in f for f in floors), "floors are calibrated the same way"


def test_label_free_probe_recovers_a_planted_value_up_to_scale_where_its_assumptions_hold():
    """Known answer for slack + neg_var: on data where the policy dominates its noisy versions along the value
    direction and that direction carries the most variance of the standardised features, the unit-norm head is
    the value up to scale (and calibration on 10% of the episodes makes it the value). Where the value is not
    the top-variance direction, nothing in the two terms points at it (dominance between separately fitted
    heads is met by their offsets alone), and the probe misses the value."""
    def cosine(a, b):
        return abs(float(a @ b)) / (np.linalg.norm(a) * np.linalg.norm(b))

    # Three initialisations: the objective is not convex, and 300 steps left one of five starts at cosine 0.26.
    for dominant, expect, init in ((3.0, True, 0), (3.0, True, 1), (3.0, True, 2), (0.0, False, 0)):
        dm = LinearValueData(dim=6, versions=3, episodes=150, dominant=dominant, seed=2, batch_size=10**6)
        torch.manual_seed(init)
        model = ValueProbe(configs={"unsup": {"slack": 1.0, "neg_var": 0.1}}, lr=0.02)
        fit(model, dm, epochs=1000)
        w = raw_weights(model, dm, "unsup")[0, :-1]
        r = row(model, "probe:unsup")
        if expect:
            assert cosine(w, dm.w_true[0]) > 0.98, cosine(w, dm.w_true[0])
            assert r["r2_exact"] > 0.95, r
            # the planted values dominate at every state (by 0.5); the fitted heads at nearly all
            assert row(model, "probe:unsup", "eps:0.25")["dominance"] > 0.9
        else:
            assert cosine(w, dm.w_true[0]) < 0.9 and r["r2_exact"] < 0.5, (cosine(w, dm.w_true[0]), r["r2_exact"])


def test_fine_tuning_starts_from_the_checkpoint_and_resuming_continues_the_step_count(tmp_path):
    dm = LinearValueData(episodes=60)
    first = ValueProbe(configs={"mc": {"mc": 1.0}}, lr=0.05, solver="sgd")
    trainer = fit(first, dm, epochs=2, root=tmp_path / "a")
    ckpt = Path(trainer.checkpoint_callback.best_model_path)
    steps = trainer.global_step
    assert steps > 0 and ckpt.is_file()

    seen = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, module):
            seen["w"] = module.linear_map("mc", HOOK)[0].clone()

    # Another loss mix: another matched penalty, so another preconditioner; the function the heads compute is kept.
    tuned = ValueProbe(configs={"mc": {"mc": 1.0, "td": 2.0}}, lr=0.05, init_from=str(ckpt), solver="sgd")
    fit(tuned, dm, epochs=1, callbacks=[Capture()])
    start = torch.load(ckpt, weights_only=True)["state_dict"]
    key = next(k for k in start if k.startswith("heads.") and k.endswith(".weight"))
    head_key = key.removeprefix("heads.").removesuffix(".weight")
    assert head_key in torch.load(ckpt, weights_only=True)["innercritic_probe"]["whitened"]
    # a preconditioned head stores u, with w_i = P_i u_i
    w_saved = torch.einsum("vde,ve->vd", start[f"whiten@{head_key}"].double(), start[key].double())
    assert torch.allclose(seen["w"].double(), w_saved, atol=1e-6), "the fine-tuned run starts from the checkpoint's weights"
    assert not torch.allclose(tuned.linear_map("mc", HOOK)[0].double(), w_saved, atol=1e-4), "and then trains"
    assert tuned.loss_configs["mc"].td == 2.0

    # On other data (other standardisation statistics) it starts from the same function of the raw activations.
    class CaptureHead(L.Callback):
        def on_train_start(self, trainer, module):
            w, b = module.linear_map("mc", HOOK)  # the function's weights (an SGD head's parameter is whitened)
            seen["head"] = (w.double().clone(), b.double().clone())

    other = LinearValueData(episodes=60, seed=1)
    moved = ValueProbe(configs={"mc": {"mc": 1.0}}, lr=0.05, init_from=str(ckpt), solver="sgd")
    fit(moved, other, epochs=1, callbacks=[CaptureHead()])
    bias_key = key.replace(".weight", ".bias")
    raw = lambda w, b, mean, std: (w / std, b - (w / std) @ mean)  # noqa: E731  (w, b) on raw activations
    tag = HOOK.replace(".", ":")
    w0, b0 = raw(w_saved, start[bias_key].double(), start[f"mean@{tag}"].double(), start[f"std@{tag}"].double())
    w1, b1 = raw(*seen["head"], other.stats[HOOK]["mean"].double(), other.stats[HOOK]["std"].double())
    assert not torch.allclose(other.stats[HOOK]["mean"], dm.stats[HOOK]["mean"]), "the two datasets standardise differently"
    assert torch.allclose(w1, w0, atol=1e-6) and torch.allclose(b1, b0, atol=1e-5), "the same function, re-expressed"
    assert torch.equal(getattr(moved, f"mean@{tag}"), other.stats[HOOK]["mean"]), "kept with this data's statistics"

    resumed = ValueProbe(configs={"mc": {"mc": 1.0}}, lr=0.05, solver="sgd")
    trainer2 = L.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path / "b", num_sanity_val_steps=0)
    trainer2.fit(resumed, datamodule=dm, ckpt_path=str(ckpt))
    assert trainer2.global_step == 2 * steps, "a resumed run continues from the checkpoint's step, not from 0"


def test_bad_probe_configurations_are_one_line_errors():
    with pytest.raises(ValueError, match=r"probe configuration 'x' has unknown key\(s\) \['mcc'\]; valid keys: .*mc"):
        ValueProbe(configs={"x": {"mcc": 1.0}})
    with pytest.raises(ValueError, match="needs at least one positive weight"):
        ValueProbe(configs={"x": {"td": 0.0}})
    with pytest.raises(ValueError, match=r"weight neg_var=-1.0 is invalid"):
        ValueProbe(configs={"x": {"neg_var": -1.0}})
    with pytest.raises(ValueError, match="probe scale 'unit' is invalid; valid: auto, none, unit_norm"):
        ValueProbe(configs={"x": {"mc": 1.0, "scale": "unit"}})
    with pytest.raises(ValueError, match="model.configs is empty"):
        ValueProbe(configs={})
    with pytest.raises(ValueError, match="slack_head 'free' is invalid"):
        ValueProbe(slack_head="free")


def test_cli_fit_writes_the_table_figures_and_the_wandb_run(tmp_path):
    """The real thing on a tiny maze agent: cache built on first use, probes fitted, judged, plotted, logged."""
    agent = write_agent_checkpoint(tmp_path / "agent.ckpt", env_kwargs={"size": 5, "max_steps": 15})
    root = tmp_path / "run"
    cmd = [sys.executable, "train.py", "fit", "-c", "configs/probe/maze.yaml", f"--data.agent_ckpt={agent}",
           f"--data.cache_dir={tmp_path / 'cache'}", "--data.episodes_per_version=12", "--data.num_envs=4",
           "--data.progress=false", "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1", "--model.planning_episodes=4", f"--trainer.default_root_dir={root}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-3000:]
    for bar in ("probe closed forms", "probe scoring"):  # the long evaluations show a bar with their total
        assert bar in done.stderr and "/6 [" in done.stderr.split(bar, 1)[1][:200], bar
    run = root / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("probe/r2_return", "ridge/r2_return", "lstd/r2_return", "critic/r2_return", "probe/r2_return_exact",
                "ridge/r2_return_exact", "lstd/r2_return_exact", "critic/r2_return_exact"):
        assert key in summary, key
    assert summary["hook"] == "encoder.hook_hidden" and summary["loss_weights"]["unsupervised"]["slack"] == 1.0
    assert summary["probe_config"] == "td" and summary["config"]["model"]["class"] == "ValueProbe", "both names kept"
    sources = {r["source"] for r in summary["table"]}
    assert sources >= {"probe:mc", "probe:td", "probe:mc_td", "probe:critic", "probe:unsupervised", "ridge", "lstd", "critic",
                       "ridge_critic", "mean", "time", "raw_obs", "random_net", "random_dir", "top_pc"}
    hooks = {r["hook"] for r in summary["table"]}
    towers = {"encoder.block0.hook_out", "encoder.block1.hook_out", "encoder.hook_hidden"}
    assert hooks == {None} | towers | {h.replace("encoder.", "critic_encoder.", 1) for h in towers}, "both towers (towers: all)"
    assert summary["solver"] == "closed_form" and summary["closed_form"] == ["td", "mc", "mc_td", "critic"]
    unsup = {r["hook"] for r in summary["table"] if r["source"] == "probe:unsupervised"}
    assert unsup == {"encoder.hook_hidden", "critic_encoder.hook_hidden"}, "the SGD configuration at its sgd_hooks only"
    control = next(r for r in summary["table"] if r["source"] == "probe:critic" and r["hook"] == "critic_encoder.hook_hidden"
                   and r["version"] == "policy")
    assert control["r2_critic"] > 0.99, "the positive control: the critic is linear in its tower's last layer"
    assert control["r2_exact_lo"] <= control["r2_exact"] <= control["r2_exact_hi"], "intervals from resampling episodes"
    for name in ("probe_vs_return", "value_traces", "per_layer", "planning"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 1000, name
    assert [r["source"] for r in summary["planning"]] == ["probe:td", "ridge", "critic", "exact", "policy", "random"]
    assert all(0 <= r["success_lo"] <= r["success"] <= r["success_hi"] <= 1 for r in summary["planning"])
    probe_file = run / "probes" / "mc@encoder.hook_hidden.pt"
    payload = torch.load(probe_file, weights_only=True)
    assert payload["weight"].shape == (3, 16) and payload["hook"] == "encoder.hook_hidden"
    direction = _probe_vector(str(probe_file), "encoder.hook_hidden", 0, (16,))  # what a steering scan reads
    assert direction.tensor.shape == (16,) and abs(direction.norm - 1.0) < 1e-5
    wandb_file = run_file(root / "wandb")
    keys = history_keys(wandb_file)
    assert {"eval/probe:mc/r2_return", "eval/ridge/r2_return", "train/loss"} <= keys, sorted(keys)[:40]
    assert any(k.startswith("probe/probe_vs_return") for k in keys), sorted(keys)
    images = list(wandb_file.parent.glob("files/media/images/probe/probe_vs_return*.png"))
    assert images, "the probe-vs-return figure is in the offline W&B run"


def test_runs_fits_each_command_in_one_process_and_frees_each_run_before_the_next(tmp_path):
    """`train.py runs` (the loop's probe stage: every seed in one process) gives each command its own run folder
    and W&B run, and keeps no run's datamodule or probe alive after it: a probe run's full-batch splits are
    gigabytes, and LightningCLI leaves its CLI object in a registry that outlives it."""
    import gc
    import json
    import warnings

    import train
    from datamodules.trajectories import TrajectoryDataModule

    agent = write_agent_checkpoint(tmp_path / "agent.ckpt")
    base = ["fit", "-c", "configs/probe/maze.yaml", f"--data.agent_ckpt={agent}", f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.episodes_per_version=6", "--data.towers=encoder", "--model.sgd_hooks=[encoder.hook_hidden]", "--trainer.max_epochs=2",
            "--trainer.check_val_every_n_epoch=1", "--data.progress=false", "--trainer.enable_progress_bar=false"]
    runs = [base + [f"--seed_everything={s}", f"--data.split_seed={s}", f"--trainer.default_root_dir={tmp_path / f's{s}'}"] for s in (0, 1)]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    train.run_many(tmp_path / "runs.json")
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every live object touches torch's deprecated aliases
        warnings.simplefilter("ignore")
        alive = [o for o in gc.get_objects() if isinstance(o, (TrajectoryDataModule, ValueProbe))]
    assert not alive, "a finished run is still alive"
    for s in (0, 1):
        summary = json.loads((tmp_path / f"s{s}" / "version_0" / "summary.json").read_text())
        assert summary["table"] and len(list((tmp_path / f"s{s}" / "wandb").glob("offline-run-*"))) == 1
