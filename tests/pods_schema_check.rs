// Holds a Rust reader of the pods file to docs/pods.schema.json, the one format. Included
// (`include!`) by the readers' tests: broker/src/file_source.rs and
// kube-double/src/podsfile.rs. tests/stack validates against the schema itself.

/// The schema, and a pods file with every field it lists (each property's first example).
fn pods_schema() -> (serde_json::Value, serde_json::Value) {
    use serde_json::{Value, json};
    let schema: Value = serde_json::from_str(include_str!("../docs/pods.schema.json"))
        .expect("docs/pods.schema.json");
    let example = |def: &str| -> Value {
        let props = schema["$defs"][def]["properties"]
            .as_object()
            .unwrap()
            .clone();
        Value::Object(
            props
                .into_iter()
                .map(|(k, v)| (k, v["examples"][0].clone()))
                .collect(),
        )
    };
    let full = json!({"pods": [example("pod")], "namespaces": [example("namespace")]});
    (schema, full)
}

/// `parse` (a pods file's text, JSON being YAML → the reader's error text) takes every
/// field of the schema, knows no other (serde lists the fields it knows when it refuses an
/// unknown one: that list must be the schema's, at every level), and needs the required ones.
fn check_pods_schema_fields(parse: impl Fn(&str) -> Result<(), String>) {
    use serde_json::{Value, json};
    let (schema, full) = pods_schema();
    parse(&full.to_string()).expect("every field of the schema");
    let names = |obj: &Value| -> Vec<String> {
        let mut v: Vec<String> = obj["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    };
    let known = |doc: Value| -> Vec<String> {
        let e = parse(&doc.to_string()).expect_err("an unknown field");
        let (_, expected) = e.split_once("expected").expect(&e);
        let mut v: Vec<String> = expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    let mut top = full.clone();
    top["colour"] = json!("red");
    assert_eq!(known(top), names(&schema));
    for (def, list) in [("pod", "pods"), ("namespace", "namespaces")] {
        let mut doc = full.clone();
        doc[list][0]["colour"] = json!("red");
        assert_eq!(known(doc), names(&schema["$defs"][def]), "{def}");
        for req in schema["$defs"][def]["required"].as_array().unwrap() {
            let mut doc = full.clone();
            doc[list][0]
                .as_object_mut()
                .unwrap()
                .remove(req.as_str().unwrap());
            assert!(parse(&doc.to_string()).is_err(), "{def} without {req}");
        }
    }
    for (field, value) in [("ips", json!(["not-an-ip"])), ("phase", json!("Sleeping"))] {
        let mut doc = full.clone();
        doc["pods"][0][field] = value;
        assert!(
            parse(&doc.to_string()).is_err(),
            "{field}: {}",
            doc["pods"][0][field]
        );
    }
    parse("{}").expect("an empty document");
}

/// What a reader made of `{"namespace": "a", "name": "b"}` and `{"name": "a"}`, in the
/// schema's terms (a field it has no value for: null), against the schema's defaults.
fn check_pods_schema_defaults(pod: serde_json::Value, namespace: serde_json::Value) {
    let (schema, _) = pods_schema();
    for (def, got) in [("pod", pod), ("namespace", namespace)] {
        for (field, prop) in schema["$defs"][def]["properties"].as_object().unwrap() {
            if ["namespace", "name"].contains(&field.as_str()) {
                continue;
            }
            let want = prop
                .get("default")
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            assert_eq!(got[field], want, "{def}.{field}");
        }
    }
}
