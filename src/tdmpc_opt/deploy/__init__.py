"""Standalone deployment: an MPPI planner over exported ONNX graphs (numpy + onnxruntime).

``tdmpc-opt export`` copies ``onnx_planner.py``, ``example.py`` and ``requirements.txt`` from
here into its output folder, which then runs without PyTorch or tdmpc-opt installed.
Nothing in this package imports torch.
"""
