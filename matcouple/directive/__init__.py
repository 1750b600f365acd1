"""Directive pattern: a diffusion model proposes crystals, filters keep the plausible ones.

``model`` (denoiser), ``diffusion`` (schedules, loss), ``data`` (training sets),
``train`` (resumable training), ``sample`` (p(N) and the reverse process), ``generate``
(runs that filter and store), ``tasks`` (FireTask), ``cli`` (``matcouple generate``).
"""
