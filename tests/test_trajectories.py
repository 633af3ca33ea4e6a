"""TrajectoryDataModule: builds / reuses / refuses the cache, splits by episode, serves whole batches.

The agent checkpoint is a real one (``tests.conftest.write_agent_checkpoint``).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import innercritic.cache.collect as collect_mod
from datamodules.trajectories import TrajectoryDataModule, main
from innercritic.cache import CacheMismatchError, TrajectoryCache
from helpers import write_agent_checkpoint

HOOKS = ["encoder.block1.hook_out", "encoder.hook_fc", "encoder.hook_hidden"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def agent_ckpt(tmp_path_factory) -> str:
    return write_agent_checkpoint(tmp_path_factory.mktemp("agent") / "agent.ckpt")


def make_dm(agent_ckpt: str, cache_dir: Path, **overrides) -> TrajectoryDataModule:
    args = dict(hook_points=HOOKS, hooks=["encoder.hook_fc"], versions=["policy", "eps:0.5"], episodes_per_version=10,
                split_fractions=(0.6, 0.2, 0.2), split_seed=7, num_envs=3, episodes_per_shard=5, batch_size=8, progress=False)
    return TrajectoryDataModule(agent_ckpt, str(cache_dir), **{**args, **overrides})


@pytest.fixture(scope="module")
def dm(agent_ckpt, tmp_path_factory) -> TrajectoryDataModule:
    module = make_dm(agent_ckpt, tmp_path_factory.mktemp("data") / "cache")
    module.prepare_data()
    module.setup("fit")
    return module


def test_prepare_data_builds_the_cache_described_by_the_arguments(dm):
    cache = TrajectoryCache(dm.cache_dir)
    assert cache.hook_points == HOOKS and cache.versions == ["policy", "eps:0.5"]
    assert cache.gamma == 0.95, "gamma=None takes the checkpoint's discount"
    assert cache.request["env"]["kwargs"] == {"size": 5, "max_steps": 12}
    assert cache.num_episodes == 20 and dm.num_states == cache.num_rows
    assert dm.num_versions == 2 and dm.feature_dims == {"encoder.hook_fc": 16} and dm.gamma == 0.95
    assert cache.manifest["source"]["agent_ckpt"] == dm.agent_ckpt


def test_splits_are_disjoint_by_episode_cover_everything_and_depend_only_on_the_seed(dm, agent_ckpt):
    train, calib, test = dm.train_episodes, dm.calib_episodes, dm.test_episodes
    assert (len(train), len(calib), len(test)) == (12, 4, 4)
    assert not set(train) & set(calib) and not set(train) & set(test) and not set(calib) & set(test)
    assert sorted([*train, *calib, *test]) == list(range(20))
    # Episode u of each version (the same level) lies in one split.
    for split in (train, calib, test):
        assert set(split % 10)
        assert sorted(split[split < 10]) == sorted(split[split >= 10] - 10)
    again = make_dm(agent_ckpt, dm.cache_dir)
    assert all(np.array_equal(a, b) for a, b in zip(again.split_episodes(), (train, calib, test)))
    other = make_dm(agent_ckpt, dm.cache_dir, split_seed=8).split_episodes()
    assert not all(np.array_equal(a, b) for a, b in zip(other, (train, calib, test)))
    # Transition rows of a split belong to its episodes only, and never include an episode's final state.
    episode, last = dm.cache.column("episode"), dm.cache.column("last")
    for name, episodes in (("train", train), ("calib", calib), ("test", test)):
        rows = dm.split_rows(name)
        assert set(episode[rows]) == set(episodes) and not last[rows].any()
        assert len(rows) == int(np.isin(episode, episodes).sum() - len(episodes))


def test_batches_carry_what_every_probe_loss_needs(dm):
    cache = dm.cache
    act = cache.column("act.encoder.hook_fc")
    seen = []
    for batch in dm.train_dataloader():
        rows = batch["state_index"].numpy()
        seen.extend(rows.tolist())
        x, x_next = batch["x"]["encoder.hook_fc"], batch["x_next"]["encoder.hook_fc"]
        assert list(batch["x"]) == ["encoder.hook_fc"], "only the requested hook points are served"
        assert x.dtype == torch.float32 and x.shape == (len(rows), 16)
        mean, std = (dm.stats["encoder.hook_fc"][k].numpy() for k in ("mean", "std"))
        assert np.allclose(x.numpy() * std + mean, act[rows], atol=1e-5), "served standardised with the train statistics"
        assert np.allclose(x_next.numpy() * std + mean, act[rows + 1], atol=1e-5)
        assert np.array_equal(cache.column("episode")[rows + 1], batch["episode"].numpy()), "s' is in the same episode"
        assert np.array_equal(cache.column("step")[rows + 1], batch["step"].numpy() + 1)
        for key, field in (("reward", "reward"), ("terminal", "terminal"), ("truncated", "truncated"), ("ret", "return"),
                           ("value", "value"), ("version", "version"), ("bootstrapped", "bootstrapped")):
            assert np.array_equal(batch[key].numpy(), cache.column(field)[rows].astype(batch[key].numpy().dtype)), key
        assert batch["terminal"].dtype == torch.float32 and batch["version"].dtype == torch.int64
        # The TD target bootstraps through truncations only: a terminal's s' is the final row, valued 0 by the data.
        term = batch["terminal"].numpy() > 0
        assert np.all(cache.column("return")[rows[term] + 1] == 0)
    assert sorted(seen) == sorted(dm.split_rows("train").tolist()), "one epoch serves every train transition once"
    in_order = sorted(seen)
    assert seen != in_order and len(seen) > 8, "train batches are shuffled"
    val = np.concatenate([b["state_index"].numpy() for b in dm.val_dataloader()])
    test = np.concatenate([b["state_index"].numpy() for b in dm.test_dataloader()])
    assert np.array_equal(val, dm.split_rows("calib")) and np.array_equal(test, dm.split_rows("test"))


def test_batch_size_0_serves_each_split_whole_from_memory(dm, agent_ckpt):
    whole = make_dm(agent_ckpt, dm.cache_dir, batch_size=0)
    whole.setup("fit")
    for split, loader in (("train", whole.train_dataloader), ("calib", whole.val_dataloader)):
        batches = list(loader())
        assert len(batches) == 1, "one batch per epoch: full-batch steps"
        (batch,) = batches
        assert np.array_equal(batch["state_index"].numpy(), whole.split_rows(split)), "every transition of the split, once"
        arrays = whole.split_arrays(split)
        assert np.array_equal(batch["x"]["encoder.hook_fc"].numpy(), arrays.x["encoder.hook_fc"]), "the split_arrays features"
        assert np.array_equal(batch["x_next"]["encoder.hook_fc"].numpy(), arrays.x_next["encoder.hook_fc"])
        # s_{t+1} is copied from the batch's own rows where it is one of them: bit for bit what reading it gives
        rows = whole.split_rows(split)
        read = whole._datasets[split].standardised("encoder.hook_fc", rows + 1)
        assert np.array_equal(batch["x_next"]["encoder.hook_fc"].numpy(), read)
        assert np.isin(rows + 1, rows).mean() > 0.5, "most successors are in the split: the copy path is exercised"
        again = next(iter(loader()))
        assert again["x"]["encoder.hook_fc"] is batch["x"]["encoder.hook_fc"], "gathered once, then served from memory"


def test_standardisation_statistics_come_from_the_train_split_only(dm):
    cache = dm.cache
    rows = np.isin(cache.column("episode"), dm.train_episodes)
    x = cache.column("act.encoder.hook_fc")[rows].astype(np.float64)
    std = x.std(0)
    std[std < 1e-8] = 1.0
    stats = dm.stats["encoder.hook_fc"]
    assert torch.allclose(stats["mean"], torch.from_numpy(x.mean(0)).float(), atol=1e-6)
    assert torch.allclose(stats["std"], torch.from_numpy(std).float(), atol=1e-6)
    everything = cache.column("act.encoder.hook_fc").astype(np.float64)
    assert not np.allclose(everything.mean(0), x.mean(0), atol=1e-7), "statistics over all splits would differ"


def test_a_matching_cache_is_reused_and_a_mismatch_is_an_error_or_a_rebuild(dm, agent_ckpt, tmp_path, monkeypatch):
    calls = []
    real = collect_mod.rollout_shard
    monkeypatch.setattr(collect_mod, "rollout_shard", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = tmp_path / "cache"
    first = make_dm(agent_ckpt, path, episodes_per_version=4, episodes_per_shard=4)
    first.prepare_data()
    assert len(calls) == 2
    make_dm(agent_ckpt, path, episodes_per_version=4, episodes_per_shard=4).prepare_data()
    assert len(calls) == 2, "a matching cache is reused, not collected again"
    other = make_dm(agent_ckpt, path, episodes_per_version=4, episodes_per_shard=4, gamma=0.5,
                    hook_points=["encoder.hook_hidden"], hooks=None)
    with pytest.raises(CacheMismatchError) as err:
        other.prepare_data()
    for part in ("hook_points", "gamma 0.95", "gamma 0.5", "encoder.hook_hidden", "--data.rebuild true"):
        assert part in str(err.value), (part, str(err.value))
    with pytest.raises(CacheMismatchError):
        other.setup("fit")
    rebuilt = make_dm(agent_ckpt, path, episodes_per_version=4, episodes_per_shard=4, gamma=0.5,
                      hook_points=["encoder.hook_hidden"], hooks=None, rebuild=True)
    rebuilt.prepare_data()
    rebuilt.setup("fit")
    assert len(calls) == 4 and rebuilt.cache.gamma == 0.5 and rebuilt.cache.hook_points == ["encoder.hook_hidden"]
    assert rebuilt.hooks == ["encoder.hook_hidden"], "hooks default to every collected hook point"


def test_bad_arguments_are_clear_errors(agent_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"unknown hook point\(s\) \['encoder.hook_fcc'\]; this agent's hook points are: .*encoder\.hook_fc,"):
        make_dm(agent_ckpt, tmp_path, hook_points=["encoder.hook_fcc"], hooks=None)
    with pytest.raises(ValueError, match=r"data.hooks \['encoder.hook_flat'\] must be a non-empty subset of the collected hook points"):
        make_dm(agent_ckpt, tmp_path, hooks=["encoder.hook_flat"])
    with pytest.raises(ValueError, match="bad policy version spec 'eps=0.1'"):
        make_dm(agent_ckpt, tmp_path, versions=["policy", "eps=0.1"])
    with pytest.raises(ValueError, match="split_fractions"):
        make_dm(agent_ckpt, tmp_path, split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match=r"data.batch_size must be >= 1 \(transitions per batch\) or 0 \(the whole split\), got -1"):
        make_dm(agent_ckpt, tmp_path, batch_size=-1)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        make_dm(str(tmp_path / "missing.ckpt"), tmp_path)


class _LinearProbe(L.LightningModule):
    """The least a probe module does with this datamodule: regress returns on the standardised activations."""

    def __init__(self) -> None:
        super().__init__()
        self.head = None

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.hook = dm.hooks[0]
        self.head = torch.nn.Linear(dm.feature_dims[self.hook], dm.num_versions)

    def training_step(self, batch, batch_idx):
        v = self.head(batch["x"][self.hook]).gather(1, batch["version"][:, None]).squeeze(1)
        return torch.nn.functional.mse_loss(v, batch["ret"])

    def validation_step(self, batch, batch_idx):
        self.log("val/mse", torch.nn.functional.mse_loss(self.head(batch["x"][self.hook])[:, 0], batch["ret"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_trainer_builds_the_cache_on_first_use_and_trains_on_it(agent_ckpt, tmp_path):
    dm = make_dm(agent_ckpt, tmp_path / "cache", episodes_per_version=4, episodes_per_shard=4, split_fractions=(0.5, 0.5, 0.0))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(_LinearProbe(), datamodule=dm)
    assert (tmp_path / "cache" / "manifest.json").is_file()
    assert math.isfinite(float(trainer.callback_metrics["val/mse"]))
    assert trainer.fit_loop.epoch_loop.global_step == len(dm.train_dataloader())


def test_command_line_collection(agent_ckpt, tmp_path, capsys):
    main(["--agent_ckpt", agent_ckpt, "--cache_dir", str(tmp_path / "cli"), "--episodes_per_version", "3",
          "--versions", "[policy, 'eps:0.1,temp:2.0']", "--env_overrides", "{cheese: anywhere}", "--activation_dtype", "float16",
          "--hook_points", "[encoder.hook_hidden]", "--progress", "false"])
    cache = TrajectoryCache(tmp_path / "cli")
    assert cache.versions == ["policy", "eps:0.1,temp:2.0"] and cache.request["env"]["overrides"] == {"cheese": "anywhere"}
    assert cache.fields["act.encoder.hook_hidden"]["dtype"] == "<f2"
    assert "6 episodes" in capsys.readouterr().out


def test_runs_of_one_process_share_the_opened_cache_and_its_exact_values_until_it_changes(agent_ckpt, tmp_path, monkeypatch):
    """`train.py runs` fits a probe sweep's seeds in one process: the second seed's datamodule must not open,
    verify or solve the cache again, and must get what a fresh process would; a rebuilt cache is opened anew."""
    from datamodules import trajectories

    opened = []
    real = trajectories.TrajectoryCache
    monkeypatch.setattr(trajectories, "TrajectoryCache", lambda *a, **k: opened.append(a) or real(*a, **k))
    monkeypatch.setattr(trajectories, "_OPENED", {})
    path = tmp_path / "cache"
    first = make_dm(agent_ckpt, path, episodes_per_version=4, episodes_per_shard=4, split_seed=0)
    first.prepare_data()
    first.setup("fit")
    second = make_dm(agent_ckpt, path, episodes_per_version=4, episodes_per_shard=4, split_seed=1)
    second.setup("fit")
    assert len(opened) == 1 and second.cache is first.cache
    assert second.exact_values() is first.exact_values(), "the maze's exact values are solved once"
    assert not np.array_equal(second.split_rows("train"), first.split_rows("train")), "each run keeps its own split"
    monkeypatch.setattr(trajectories, "_OPENED", {})
    alone = make_dm(agent_ckpt, path, episodes_per_version=4, episodes_per_shard=4, split_seed=1)
    alone.setup("fit")
    assert np.array_equal(alone.exact_values(), second.exact_values())
    assert all(torch.equal(alone.stats[h][k], second.stats[h][k]) for h in alone.stats for k in ("mean", "std"))
    rebuilt = make_dm(agent_ckpt, path, episodes_per_version=4, episodes_per_shard=4, collect_seed=5, rebuild=True)
    rebuilt.prepare_data()
    rebuilt.setup("fit")
    assert len(opened) == 3 and rebuilt.cache is not alone.cache, "a rebuilt cache (a new manifest) is opened anew"
