"""Activation steering: vectors (contrast pairs, mean differences, probe directions, random controls),
coefficient scans over held-out episodes, and per-square action maps of a maze policy.

Method: activation addition (Turner et al. 2023, "Steering GPT-2-XL by adding an activation
vector"), with the maze's cheese and top-right vectors of Mini et al. 2023 ("Understanding and Controlling a
Maze-Solving Policy Network"). Framework-free: no Lightning here; ``lightning_modules.steering``
runs a scan from the command line::

    python train.py test -c configs/steer/maze.yaml --model.agent_ckpt A.ckpt
"""

from innercritic.steering.action_map import ActionMap, action_map, action_map_figure, draw_action_map
from innercritic.steering.scan import (
    HELDOUT_SEED_OFFSET,
    MEAN_METRICS,
    PROPORTION_METRICS,
    Steer,
    check_coefficients,
    normal_interval,
    play_blocks,
    play_episodes,
    run_scan,
    run_scans,
    summarise_episodes,
    wilson_interval,
)
from innercritic.steering.vectors import (
    CONTRASTS,
    LevelVectors,
    SteeringVector,
    activation_shape,
    averaged_vector,
    check_steering,
    check_vector,
    contrast_observations,
    mean_difference,
    mean_difference_from_cache,
    probe_direction,
    random_like,
)

__all__ = [
    "CONTRASTS",
    "HELDOUT_SEED_OFFSET",
    "MEAN_METRICS",
    "PROPORTION_METRICS",
    "ActionMap",
    "LevelVectors",
    "Steer",
    "SteeringVector",
    "action_map",
    "action_map_figure",
    "activation_shape",
    "averaged_vector",
    "check_coefficients",
    "check_steering",
    "check_vector",
    "contrast_observations",
    "draw_action_map",
    "mean_difference",
    "mean_difference_from_cache",
    "normal_interval",
    "play_blocks",
    "play_episodes",
    "probe_direction",
    "random_like",
    "run_scan",
    "run_scans",
    "summarise_episodes",
    "wilson_interval",
]
