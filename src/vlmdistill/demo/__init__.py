"""The demo world job: a teacher that knows every class, students distilled from ID classes only."""
