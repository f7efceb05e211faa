"""DVC-versioned ablation study of ResNet and SVM classifiers on MNIST and Fashion-MNIST."""
