"""tdmpc-opt: TD-MPC2 agents made small, fast and deployable.

Public API: :func:`load_agent`, :class:`Agent`, :class:`TdmpcError`.
"""

from tdmpc_opt.agent import Agent, load_agent
from tdmpc_opt.errors import TdmpcError

__version__ = "0.1.0"
__all__ = ["Agent", "TdmpcError", "__version__", "load_agent"]
