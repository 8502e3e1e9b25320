"""p5jax: P5 ("Recommendation as Language Processing") in JAX/Flax, T5X/SeqIO style.

Submodules are imported explicitly (``from p5jax import network``); importing the
package itself stays cheap so that command-line tools start fast.
"""

__version__ = "0.1.0"
