"""A miniature in the paper's regime (``bench/fidelity.py``): a vocabulary much larger than the teacher's
top-k, a heavy-tailed teacher, long traces, and a student whose habits are outliers to the teacher."""
