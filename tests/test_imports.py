"""The core package stays framework-free: importing it must not pull in Lightning."""

import subprocess
import sys


def test_import_innercritic_does_not_import_lightning():
    code = (
        "import sys, innercritic, innercritic.envs, innercritic.agents, innercritic.probing, "
        "innercritic.steering, innercritic.cache, innercritic.envs.maze, innercritic.envs.factory, "
        "innercritic.agents.networks, innercritic.agents.hooks, innercritic.agents.checkpoint; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'wandb')); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"importing innercritic imported {result.stdout.strip()} {result.stderr[-500:]}"
