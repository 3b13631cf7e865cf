//! Generated code of the admin API (reserved).
