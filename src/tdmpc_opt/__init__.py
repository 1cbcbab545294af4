"""tdmpc-opt: TD-MPC2 agents made small, fast and deployable.

Public API: :func:`load_agent`, :class:`Agent`, :class:`TdmpcError`. ``Agent`` and
``load_agent`` are imported on first use, so that the command line (``--help``, ``--version``,
refusing a bad argument) starts without importing PyTorch.
"""

from tdmpc_opt.errors import TdmpcError

__version__ = "0.1.0"
__all__ = ["Agent", "TdmpcError", "__version__", "load_agent"]


def __getattr__(name: str):
    if name in ("Agent", "load_agent"):
        from tdmpc_opt import agent

        return getattr(agent, name)
    raise AttributeError(f"module 'tdmpc_opt' has no attribute {name!r}")
