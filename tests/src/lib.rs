
pub mod s3;
pub mod hub;
pub mod postgres;
