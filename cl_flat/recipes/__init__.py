"""The workflows users run, above the library; `cl_flat.cli` parses a command's arguments and calls one:

- `train`: the task sequence (`run_sequence`, `cl-flat train`), through `skeleton` (init, the folder,
  prepare, config.yaml, tracker, zero-shot, per unit: stack, train, save, evaluate, results);
- `reference`: its reference runs (`run_reference`, `cl-flat train --reference per_task|joint`), through
  the same skeleton;
- `eval`: a saved run's last adapter stack scored again (`reevaluate`, `cl-flat eval`);
- `landscape`: loss landscapes and sharpness of a saved run's tasks (`landscapes`, `cl-flat landscape`);
- `bench`: seconds per update and peak memory of every flatness method (`run_bench`, `cl-flat bench`);
- `validate`: a config checked without training (`cl-flat validate`);
- `metrics`: the forgetting metrics of a saved matrix, with reference runs (`cl-flat metrics`).
Modules are imported by the command that needs them (this package imports none: `cl-flat metrics` must
not load torch's training stack).
"""
