"""fundiff-example: a third-party fundiff plugin distribution.

Each component lives in its own module, and each module is one entry point of the
``fundiff`` group (see pyproject.toml):

* ``quadratic_logsnr``: the schedule ``quadratic-logsnr``;
* ``euler_x0``: the sampler ``euler-x0``.
"""

__version__ = "0.1.0"
