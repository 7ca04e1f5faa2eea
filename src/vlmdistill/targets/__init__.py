"""Teacher image targets: computed once per (teacher, preprocessing, image list, views) and cached."""
