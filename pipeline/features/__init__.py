"""Feature spaces: the study's images, their decoding and preprocessing, the Taskonomy encoders
and their checkpoints, and the registry of configured feature spaces."""
