"""tdmpc-opt."""
