"""Layer 6, gpu: the study's GPU half on a lent machine without DVC: plan, launch, fuse, archive,
and the archive taken back in.
"""
