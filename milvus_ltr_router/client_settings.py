"""The settings both routed clients expose (:class:`.client.RoutedMilvusClient` and
:class:`.async_client.AsyncRoutedMilvusClient`), read from and written to the parts that hold
them - the routing table, the batch planner, the search telemetry and the routed writes - under
the names they always had."""
from __future__ import annotations


class RoutedClientSettings:
    """Mixin over ``self._routing`` (:class:`.serving.RoutingTable`), ``self._planner``
    (:class:`.search_planning.SearchPlanner`), ``self._telemetry``
    (:class:`.search_planning.SearchTelemetry`) and ``self._writes``
    (:class:`.writes.RoutedWrites`)."""

    registry = property(lambda self: self._routing.registry)
    router_threads = property(lambda self: self._routing.router_threads)
    cost_model = property(lambda self: self._planner.cost_model)
    recall_sample = property(lambda self: self._telemetry.recall_sample)

    @property
    def batch_planning(self) -> bool:
        return self._planner.batch_planning

    @batch_planning.setter
    def batch_planning(self, value: bool) -> None:
        self._planner.batch_planning = bool(value)

    @property
    def reload_interval(self) -> float:
        return self._routing.reload_interval

    @reload_interval.setter
    def reload_interval(self, value: float) -> None:
        self._routing.reload_interval = value

    @property
    def size_refresh_interval(self) -> float:
        return self._writes.refresh_interval

    @size_refresh_interval.setter
    def size_refresh_interval(self, value: float) -> None:
        self._writes.refresh_interval = value
