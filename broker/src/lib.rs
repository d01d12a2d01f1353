pub mod pods;
