"""DFT engines behind one interface, and the FireWorks workflows that run them.

``engine.get_engine("gpaw")`` runs here (GPAW through ASE); ``get_engine("vasp")`` runs
VASP through atomate2's makers on a cluster. ``calculation.run_dft`` relaxes one
structure; ``workflows.submit_dft`` adds workflows for many.
"""
