"""Taking the model out: a finished run's model in safetensors, TorchScript or ONNX, with a
model card stating how it was made and what privacy its data sources kept.

``run_dir`` reads and verifies a master's run directory, ``formats`` writes and checks each
format, ``card`` builds the model card, ``exporter`` ties them together
(:func:`~secure_fed.export.exporter.export_run`; ``secure-fed export`` on the command line).
"""
