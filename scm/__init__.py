"""sCM's math in pure PyTorch: TrigFlow (``trigflow``), networks (``nn``), losses, samplers, EMA, an exact toy teacher.

Nothing here imports the rest of the project (``study``, ``stages``, ``pipeline``); see docs/method.md.
"""
