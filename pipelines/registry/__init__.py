"""What can be run: the model and scheduler registries, tiny pipelines built from configs."""
