"""The auxiliary tasks of the ROCK block, one module each (scene, depth, normals), and their registry.

Each task module declares everything about its task in one place (`base.AuxTask`); `registry` is the one ordered
list of tasks, which the criterion, the loss normalisation, the ROCK block's heads, evaluation metrics, the training
pictures, the data pipeline (decoding, augmentation, collation) and detection iterate over (docs/architecture.md,
"Auxiliary tasks").
"""
