"""Container images of the pipeline: Dockerfiles, their build script, and `refs`, the one place image names live."""
