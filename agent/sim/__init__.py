"""Synthetic station scenes: Fashion-MNIST test items on a conveyor or bench as a station camera sees them
(``scenes``), and scoring a station's messages against their truth (``score``).

Used by ``python -m agent demo``, ``benchmarks/station_view.py`` and the tests. numpy and OpenCV only:
the agent package never imports torch.
"""
