"""Actor-critic networks with a named hook point after every intermediate output.

Three encoder architectures ("towers"):

- ``"impala"``: the IMPALA residual CNN (Espeholt et al. 2018, "IMPALA: Scalable Distributed Deep-RL
  with Importance Weighted Actor-Learner Architectures"), as used for procgen (Cobbe et al. 2020):
  per stage conv3x3 -> maxpool3x3/2 -> two residual blocks; then ReLU, flatten, linear, ReLU.
- ``"small"``: a few conv3x3 stride-1 layers for small grids; then flatten, linear, ReLU.
- ``"nature"``: the Nature DQN CNN (Mnih et al. 2015, "Human-level control through deep
  reinforcement learning"): 32 8x8/4, 64 4x4/2, 64 3x3/1, linear 512.

:class:`ActorCritic` puts a policy head and a value head on either one shared tower (``encoder``) or
on two (``encoder`` for the policy, ``critic_encoder`` for the critic), so that with
``separate_critic=True`` the policy network (``encoder`` + ``policy_head``) does no critic
computation: a value estimate found inside it was not put there by the critic head.

Hook point names are module paths (after TransformerLens); with ``T`` the tower
(``encoder`` or ``critic_encoder``)::

    impala  T.block{i}.hook_conv         stage conv output          (C_i, H_i, W_i)
            T.block{i}.hook_pool         max-pool output            (C_i, ceil(H_i/2), ceil(W_i/2))
            T.block{i}.res{j}.hook_conv0 first conv of residual branch
            T.block{i}.res{j}.hook_conv1 second conv of residual branch
            T.block{i}.res{j}.hook_out   residual sum (the residual stream)
    small,  T.block{i}.hook_conv         conv output, before ReLU   (C_i, H_i, W_i)
    nature  T.block{i}.hook_out          after ReLU                 (C_i, H_i, W_i)
    all     T.hook_flat                  flattened conv features    (C*H*W,)
    small   T.hook_agent                 last conv output at the agent's square (C,), with agent_channel
            T.hook_fc                    linear layer, before ReLU  (hidden,)
            T.hook_hidden                final features             (hidden,)
    top     hook_logits (A,), hook_value ()

Initialisation follows CleanRL's PPO (Huang et al. 2022): orthogonal weights with gain sqrt(2) for
hidden layers, 0.01 for the policy head, 1.0 for the value head; zero biases.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from innercritic.agents.hooks import HookedModule, HookPoint
from innercritic.errors import InnerCriticError

__all__ = ["ARCHS", "ActorCritic"]

ARCHS = ("impala", "small", "nature")
_DEFAULT_CHANNELS = {"impala": (16, 32, 32), "small": (16, 32, 32), "nature": (32, 64, 64)}
_DEFAULT_HIDDEN = {"impala": 256, "small": 256, "nature": 512}
# Nature CNN layers as (kernel, stride); the channels come from ``channels``.
_NATURE_LAYERS = ((8, 4), (4, 2), (3, 1))
_HIDDEN_GAIN = math.sqrt(2)


def _init(layer: nn.Conv2d | nn.Linear, gain: float) -> nn.Conv2d | nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _tower_widths(arch: str, channels: Any, hidden: Any, default_channels: tuple[int, ...], default_hidden: int,
                  prefix: str) -> tuple[tuple[int, ...], int]:
    """A tower's (channels, hidden), the defaults filling None; ``prefix`` names the arguments in errors."""
    channels = default_channels if channels is None else tuple(int(c) for c in channels)
    if not channels or min(channels) < 1:
        raise InnerCriticError(f"{prefix}channels must be a non-empty tuple of positive ints, got {channels}")
    if arch == "nature" and len(channels) != len(_NATURE_LAYERS):
        raise InnerCriticError(f"arch 'nature' has {len(_NATURE_LAYERS)} conv layers, got {prefix}channels {channels}")
    hidden = default_hidden if hidden is None else int(hidden)
    if hidden < 1:
        raise InnerCriticError(f"{prefix}hidden must be at least 1, got {hidden}")
    return channels, hidden


class _ResidualBlock(nn.Module):
    """IMPALA residual block: x + conv1(relu(conv0(relu(x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = _init(nn.Conv2d(channels, channels, 3, padding=1), _HIDDEN_GAIN)
        self.hook_conv0 = HookPoint()  # (C, H, W)
        self.conv1 = _init(nn.Conv2d(channels, channels, 3, padding=1), _HIDDEN_GAIN)
        self.hook_conv1 = HookPoint()  # (C, H, W)
        self.hook_out = HookPoint()  # (C, H, W)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.hook_conv0(self.conv0(F.relu(x)))
        branch = self.hook_conv1(self.conv1(F.relu(branch)))
        return self.hook_out(x + branch)


class _ImpalaStage(nn.Module):
    """IMPALA stage: conv3x3 -> maxpool3x3 stride 2 -> two residual blocks."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = _init(nn.Conv2d(in_channels, channels, 3, padding=1), _HIDDEN_GAIN)
        self.hook_conv = HookPoint()  # (C, H, W)
        # padding=1 gives ceil(H/2), the 'SAME' pooling of the procgen IMPALA network, so odd and tiny
        # grids (5x5 -> 3x3 -> 2x2 -> 1x1) keep every square.
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.hook_pool = HookPoint()  # (C, ceil(H/2), ceil(W/2))
        self.res0 = _ResidualBlock(channels)
        self.res1 = _ResidualBlock(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_pool(self.pool(self.hook_conv(self.conv(x))))
        return self.res1(self.res0(x))


class _ConvReLU(nn.Module):
    """One conv layer followed by ReLU (small and Nature CNNs)."""

    def __init__(self, in_channels: int, channels: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = _init(nn.Conv2d(in_channels, channels, kernel, stride=stride, padding=padding), _HIDDEN_GAIN)
        self.hook_conv = HookPoint()  # (C, H', W')
        self.hook_out = HookPoint()  # (C, H', W')

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_out(F.relu(self.hook_conv(self.conv(x))))


def _recentre(features: Tensor, mask: Tensor) -> Tensor:
    """(B, C, H, W) features moved so that the square ``mask`` (B, H, W) marks sits at the centre of a
    zero-padded (B, C, 2H-1, 2W-1) frame: the dense layer then sees the maze relative to the agent, and
    what it learns about "a corridor two squares up" holds wherever the agent stands. A frame with no
    marked square is placed as if the agent stood at (0, 0)."""
    b, c, h, w = features.shape
    where = mask.flatten(1).argmax(1)
    row, col = where // w, where % w
    # Frame square (i, j) reads feature square (row + i - h + 1, col + j - w + 1), or a zero where that
    # falls off the grid: one gather from the H*W squares plus a zero slot at index H*W. (Padding the
    # features to (3H-2, 3W-2) first gives the same values, but its backward fills and scatters into a
    # tensor 7.6x larger on 9x9 grids, a tenth of a PPO update's time.)
    rows = row[:, None] + torch.arange(-(h - 1), h, device=features.device)  # (B, 2H-1)
    cols = col[:, None] + torch.arange(-(w - 1), w, device=features.device)  # (B, 2W-1)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    index = torch.where(inside, rows[:, :, None] * w + cols[:, None, :], h * w).flatten(1)
    slots = torch.cat((features.flatten(2), features.new_zeros(b, c, 1)), 2)  # (B, C, H*W + 1)
    # gather, not advanced indexing: its backward is a scatter-add, several times faster on CPU than
    # the sorted index_put that advanced indexing needs
    return slots.gather(2, index[:, None].expand(b, c, -1)).view(b, c, 2 * h - 1, 2 * w - 1)


class _Tower(nn.Module):
    """A conv stack (modules ``block0``, ``block1`` ...), then flatten -> linear(hidden) -> ReLU."""

    def __init__(self, arch: str, obs_shape: tuple[int, int, int], channels: tuple[int, ...], hidden: int,
                 agent_channel: int | None = None, egocentric: bool = False) -> None:
        super().__init__()
        self.arch = arch
        self.agent_channel = agent_channel
        self.egocentric = egocentric
        in_channels = obs_shape[0]
        blocks: list[nn.Module] = []
        for i, out_channels in enumerate(channels):
            if arch == "impala":
                block: nn.Module = _ImpalaStage(in_channels, out_channels)
            elif arch == "small":
                block = _ConvReLU(in_channels, out_channels, 3, 1, 1)
            else:
                kernel, stride = _NATURE_LAYERS[i]
                block = _ConvReLU(in_channels, out_channels, kernel, stride, 0)
            self.add_module(f"block{i}", block)
            blocks.append(block)
            in_channels = out_channels
        # A tuple of the registered modules: iterating it avoids nn.Module.__getattr__ on every forward.
        self._blocks = tuple(blocks)
        self.conv_out_shape = self._conv_out_shape(obs_shape)
        self.hook_flat = HookPoint()  # (C * H * W,) of the last conv output; (C * (2H-1) * (2W-1),) egocentric
        c, h, w = self.conv_out_shape
        in_features = c * (2 * h - 1) * (2 * w - 1) if egocentric else c * h * w
        if agent_channel is not None:
            self.hook_agent = HookPoint()  # (C,) last conv output at the agent's square
            in_features += self.conv_out_shape[0]
        self.fc = _init(nn.Linear(in_features, hidden), _HIDDEN_GAIN)
        self.hook_fc = HookPoint()  # (hidden,)
        self.hook_hidden = HookPoint()  # (hidden,)

    def _conv_out_shape(self, obs_shape: tuple[int, int, int]) -> tuple[int, ...]:
        height, width = obs_shape[1:]
        if self.arch == "nature":
            for kernel, stride in _NATURE_LAYERS:
                height, width = (height - kernel) // stride + 1, (width - kernel) // stride + 1
            if height < 1 or width < 1:
                raise InnerCriticError(
                    f"arch 'nature' needs observations of at least 36x36 (84x84 is standard), got "
                    f"{obs_shape[1]}x{obs_shape[2]}; use arch='impala' or 'small' for small grids"
                )
        with torch.no_grad():
            return tuple(self._convs(torch.zeros(1, *obs_shape)).shape[1:])

    def _convs(self, x: Tensor) -> Tensor:
        for block in self._blocks:
            x = block(x)
        if self.arch == "impala":
            # The residual stream is pre-activation; the other archs end in a ReLU already.
            x = F.relu(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(self.trunk(x))

    def trunk(self, x: Tensor) -> Tensor:
        """Everything before the dense layer: the conv stack and the flattened features it feeds to ``fc``.

        Each row depends on its own input row only (convs, ReLU, gathers), which lets a caller compute
        it once per distinct observation; the dense layer is split off because a matrix product's
        rounding may depend on how many rows it multiplies at once (see :meth:`ActorCritic.trunk`).
        """
        conv = self._convs(x)
        if self.egocentric:
            flat = self.hook_flat(_recentre(conv, x[:, self.agent_channel]).flatten(1))
        else:
            flat = self.hook_flat(conv.flatten(1))
        if self.agent_channel is not None:
            # The conv features at the agent's square, read through the obs channel that marks it: a
            # translation-equivariant path beside the position-specific flatten, so what the policy
            # learns at one square transfers to every square (stride-1 convs keep the grid aligned).
            mask = x[:, self.agent_channel]
            at_agent = self.hook_agent(torch.einsum("bchw,bhw->bc", conv, mask))
            flat = torch.cat((flat, at_agent), 1)
        return flat

    def dense(self, flat: Tensor) -> Tensor:
        """The tower's final features from its :meth:`trunk` output."""
        return self.hook_hidden(F.relu(self.hook_fc(self.fc(flat))))


class ActorCritic(HookedModule):
    """Policy and value heads on an IMPALA, small or Nature CNN, with a shared or a separate critic tower.

    ``forward(obs)`` takes a (B, C, H, W) uint8 or float batch and returns ``(logits (B, A), value
    (B,))`` in float32. ``ActorCritic(**model.config)`` rebuilds the same architecture.

    On CPU, ``model.to(memory_format=torch.channels_last)`` speeds the IMPALA tower up (9x9 obs, batch
    256, 2 cores: forward about 12 -> 7 ms; the small CNN gains little) with the same results up to
    float rounding; it is
    left to the caller because the cached conv activations then come back channels-last, and
    ``.view()`` on them fails (``.reshape()`` works).
    """

    def __init__(
        self,
        obs_shape: tuple[int, int, int],  # observation (channels, height, width)
        num_actions: int,  # size of the discrete action space
        arch: str = "impala",  # encoder architecture: "impala", "small" or "nature"
        separate_critic: bool = False,  # give the critic its own tower so the policy network holds no critic
        obs_scale: float = 1.0,  # multiplies the float observation first: 1.0 for 0/1 grids, 1/255 for Atari
        channels: tuple[int, ...] | None = None,  # conv channels per stage/layer; None: the arch's default
        hidden: int | None = None,  # width of the final features; None: 256, or 512 for "nature"
        agent_channel: int | None = None,  # "small" only: also read the features at the square this obs channel marks (the maze's mouse: 1)
        egocentric: bool = False,  # with agent_channel: the dense layer reads the last conv features recentred on that square
        critic_channels: tuple[int, ...] | None = None,  # separate_critic only: the critic tower's conv channels; None: channels
        critic_hidden: int | None = None,  # separate_critic only: the critic tower's feature width; None: hidden
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise InnerCriticError(f"unknown arch {arch!r}; valid: {', '.join(repr(a) for a in ARCHS)}")
        obs_shape = tuple(int(d) for d in obs_shape)
        if len(obs_shape) != 3 or min(obs_shape) < 1:
            raise InnerCriticError(f"obs_shape must be (channels, height, width) with positive sizes, got {obs_shape}")
        if int(num_actions) < 1:
            raise InnerCriticError(f"num_actions must be at least 1, got {num_actions}")
        channels, hidden = _tower_widths(arch, channels, hidden, _DEFAULT_CHANNELS[arch], _DEFAULT_HIDDEN[arch], "")
        if agent_channel is not None:
            agent_channel = int(agent_channel)
            if arch != "small":
                raise InnerCriticError(f"agent_channel needs arch 'small' (stride-1 convs keep the grid aligned), got arch {arch!r}")
            if not 0 <= agent_channel < obs_shape[0]:
                raise InnerCriticError(f"agent_channel must index one of the {obs_shape[0]} observation channels, got {agent_channel}")
        if egocentric and agent_channel is None:
            raise InnerCriticError("egocentric needs agent_channel (the observation channel that marks the agent's square)")
        if not separate_critic and (critic_channels is not None or critic_hidden is not None):
            raise InnerCriticError("critic_channels and critic_hidden size a separate critic tower; set separate_critic=True or leave them None")
        critic_channels, critic_hidden = _tower_widths(arch, critic_channels, critic_hidden, channels, hidden, "critic_")

        self.obs_shape = obs_shape
        self.num_actions = int(num_actions)
        self.arch = arch
        self.separate_critic = bool(separate_critic)
        self.obs_scale = float(obs_scale)
        self.channels = channels
        self.hidden = hidden
        self.agent_channel = agent_channel
        self.egocentric = bool(egocentric)
        self.critic_channels = critic_channels if self.separate_critic else channels
        self.critic_hidden = critic_hidden if self.separate_critic else hidden

        # Registration order is forward order (encoder, critic_encoder, heads), which hook_names relies on.
        self.encoder = _Tower(arch, obs_shape, channels, hidden, agent_channel, self.egocentric)
        self.critic_encoder = (_Tower(arch, obs_shape, self.critic_channels, self.critic_hidden, agent_channel, self.egocentric)
                               if self.separate_critic else None)
        self.policy_head = _init(nn.Linear(hidden, self.num_actions), 0.01)
        self.value_head = _init(nn.Linear(self.critic_hidden, 1), 1.0)
        self.hook_logits = HookPoint()  # (A,)
        self.hook_value = HookPoint()  # ()
        self.setup_hooks()

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments as JSON-serialisable plain types: ``ActorCritic(**config)`` rebuilds it."""
        return {
            "obs_shape": list(self.obs_shape),
            "num_actions": self.num_actions,
            "arch": self.arch,
            "separate_critic": self.separate_critic,
            "obs_scale": self.obs_scale,
            "channels": list(self.channels),
            "hidden": self.hidden,
            "agent_channel": self.agent_channel,
            "egocentric": self.egocentric,
            "critic_channels": list(self.critic_channels) if self.separate_critic else None,
            "critic_hidden": self.critic_hidden if self.separate_critic else None,
        }

    def tower_hook_names(self, tower: str = "encoder") -> list[str]:
        """The hook points inside one tower (``"encoder"`` or ``"critic_encoder"``), in forward order."""
        towers = ("encoder", "critic_encoder") if self.separate_critic else ("encoder",)
        if tower not in towers:
            raise InnerCriticError(f"unknown tower {tower!r}; this network has {', '.join(repr(t) for t in towers)}")
        return [name for name in self.hook_names if name.startswith(tower + ".")]

    def representation_hook_names(self, tower: str = "encoder") -> list[str]:
        """One hook point per distinct representation of a tower, in forward order: each block's output,
        the features at the agent's square (with ``agent_channel``) and the final features. Leaves out the
        pre-activation and flattened copies, which hold the same information as a neighbour."""
        names = self.tower_hook_names(tower)
        block_out = ".res1.hook_out" if self.arch == "impala" else ".hook_out"
        keep = [n for n in names if n.endswith(block_out) and n.count(".") == block_out.count(".") + 1]
        keep += [n for n in names if n.endswith((".hook_agent", ".hook_hidden"))]
        return keep

    def _prepare(self, obs: Tensor) -> Tensor:
        if obs.dim() != 4 or tuple(obs.shape[1:]) != self.obs_shape:
            raise InnerCriticError(f"expected obs of shape (B, {', '.join(map(str, self.obs_shape))}), got {tuple(obs.shape)}")
        x = obs.float()
        if self.obs_scale != 1.0:
            x = x * self.obs_scale
        return x

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, A) and value (B,) for a (B, C, H, W) batch of observations."""
        x = self._prepare(obs)
        features = self.encoder(x)
        critic_features = features if self.critic_encoder is None else self.critic_encoder(x)
        logits = self.hook_logits(self.policy_head(features))
        value = self.hook_value(self.value_head(critic_features).squeeze(-1))
        return logits, value

    def trunk(self, obs: Tensor, critic: bool = True) -> tuple[Tensor, Tensor | None]:
        """The input of each tower's dense layer: ``(policy tower, critic tower)``, the second None
        without a separate critic (or with ``critic=False``, which skips that tower).
        ``head(*trunk(obs))`` equals ``forward(obs)`` bit for bit.

        The split is where the arithmetic changes kind: the trunk is convolutions and row-wise ops, and a
        row's trunk had the same bits in every batch of 2 or more rows on the CPUs measured (oneDNN's
        convolution; a batch of one takes another kernel), while the dense layers and heads are matrix
        products whose rounding MKL picks by the number of rows. A steering scan
        (``innercritic.steering.lockstep``) therefore batches and caches the trunk across its runs, and
        runs the heads on each run's own rows, so that every run keeps its bits.
        """
        x = self._prepare(obs)
        return self.encoder.trunk(x), None if self.critic_encoder is None or not critic else self.critic_encoder.trunk(x)

    def head(self, flat: Tensor, critic_flat: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits (B, A) and value (B,) from the :meth:`trunk` outputs."""
        if (critic_flat is None) != (self.critic_encoder is None):
            raise InnerCriticError("head takes the critic tower's trunk output exactly when the network has a separate critic (see trunk())")
        features = self.encoder.dense(flat)
        critic_features = features if self.critic_encoder is None else self.critic_encoder.dense(critic_flat)
        logits = self.hook_logits(self.policy_head(features))
        value = self.hook_value(self.value_head(critic_features).squeeze(-1))
        return logits, value

    def head_logits(self, flat: Tensor) -> Tensor:
        """The logits of :meth:`head` alone, from the policy tower's trunk output."""
        return self.hook_logits(self.policy_head(self.encoder.dense(flat)))

    def policy_logits(self, obs: Tensor) -> Tensor:
        """Logits only, skipping the critic tower when there is one (rollouts that need no value)."""
        return self.hook_logits(self.policy_head(self.encoder(self._prepare(obs))))

    def value(self, obs: Tensor) -> Tensor:
        """Value only, skipping the policy tower when there is one (a rollout's values, in one batch)."""
        x = self._prepare(obs)
        features = self.encoder(x) if self.critic_encoder is None else self.critic_encoder(x)
        return self.hook_value(self.value_head(features).squeeze(-1))
