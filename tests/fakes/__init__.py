"""What the tests stand in for, in one place: a Kubernetes API (pods and SeldonDeployments), a
Prometheus, an Airflow task context, and small real models to serve. Free ports come from the
package's own ``airloop.ports.free_port``."""
