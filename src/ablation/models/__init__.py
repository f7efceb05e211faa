"""The models as a product: the kept models by name (dvc.yaml's artifacts), their versions and
stages as GTO git tags, and a card for each written from the record (python -m ablation.models).
"""
