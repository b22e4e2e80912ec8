"""Build step of the embedded default model `gpt-oss-tiny` (not the runtime: server/, engine/,
model/ and harmony/ never import this package). `python -m demo train|export|eval`."""
